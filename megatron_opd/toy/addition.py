"""The CPU main job's reasoning task: multi-digit addition written out step by step, with carries.

Why it exists: the CPU demonstration needs a task where a tiny model can reason (and be checked exactly), where
the teacher's way of reasoning is learnable by a student in a few minutes, and where the student's mistakes sit
early in the response, so horizon control (POPD, TOPD) has something to fix cheaply
(see the team notes ``shared/notes/toy-opd-findings.md``). For D = 4 digits (0472 + 3856):

    prompt   ``d0c4b7a2+D3C8B5A6:``                               each digit tagged with its place letter
    teacher  ``a2+A6+0=08;b7+B5+0=12;c4+C8+1=13;d0+D3+1=04;=04328``  then EOS
    shortcut ``=04328``                                           then EOS   (the answer with no reasoning)

Each step names its place (a = units, lower case for the first operand, upper case for the second), the two
digits, the carry in, then carry and digit out; the answer is the final carry and the digits, most significant
first. The place letters make every look-up a match on content: a Qwen2 model has rotary (relative)
positions only, and with untagged digits (``0472+3856:``) a 2-layer model learned the look-ups several times
slower. A tiny model writes the trace correctly but cannot add in one shot, so a student that mostly takes the
shortcut (its choice is the response's first token) is far less accurate than the teacher. The final answer is
the digit string after the last ``=``; the checker compares it exactly with the gold sum.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

PROMPT_END = ":"
STEP_END = ";"
ANSWER_MARK = "="
MAX_DIGITS = 10
_LOWER, _UPPER = string.ascii_lowercase[:MAX_DIGITS], string.ascii_uppercase[:MAX_DIGITS]
TRACE_START = _LOWER[0]
"""The step-by-step trace's first character (the units place letter), whatever the width."""


def alphabet(digits: int) -> str:
    """Every character the task writes for ``digits``-digit operands: the toy tokenizer's vocabulary."""
    if not 1 <= digits <= MAX_DIGITS:
        raise ValueError(f"digits must be in [1, {MAX_DIGITS}], got {digits}")
    return "0123456789+=;:" + _LOWER[:digits] + _UPPER[:digits]


@dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int
    digits: int

    @property
    def prompt(self) -> str:
        xs, ys = f"{self.a:0{self.digits}d}", f"{self.b:0{self.digits}d}"
        d = self.digits
        first = "".join(_LOWER[d - 1 - k] + xs[k] for k in range(d))
        second = "".join(_UPPER[d - 1 - k] + ys[k] for k in range(d))
        return f"{first}+{second}{PROMPT_END}"

    @property
    def answer(self) -> str:
        """The gold sum, zero-padded to ``digits + 1`` characters (the width both formats write)."""
        return f"{self.a + self.b:0{self.digits + 1}d}"

    def steps(self, carry_drop: set[int] | frozenset[int] = frozenset()) -> str:
        """The step-by-step trace, least significant digit first; steps in ``carry_drop`` lose their carry-in
        (a sloppy reasoner), and the final answer is assembled from the written steps, errors included."""
        xs, ys = f"{self.a:0{self.digits}d}"[::-1], f"{self.b:0{self.digits}d}"[::-1]
        carry, parts, out_digits = 0, [], []
        for i, (x, y) in enumerate(zip(xs, ys)):
            c_in = 0 if i in carry_drop else carry
            s = int(x) + int(y) + c_in
            parts.append(f"{_LOWER[i]}{x}+{_UPPER[i]}{y}+{c_in}={s // 10}{s % 10}{STEP_END}")
            out_digits.append(str(s % 10))
            carry = s // 10
        answer = str(carry) + "".join(reversed(out_digits))
        return "".join(parts) + ANSWER_MARK + answer

    def teacher_response(self) -> str:
        return self.steps()

    def shortcut_response(self) -> str:
        return ANSWER_MARK + self.answer


def prompt_length(digits: int) -> int:
    """Characters of a prompt: a place letter and a digit per digit of each operand, '+' and ':'."""
    return 4 * digits + 2


def response_length(digits: int) -> int:
    """Characters of the step-by-step response (without EOS): 11 per digit, then '=' and digits + 1."""
    return 11 * digits + 1 + digits + 1


def make_problems(
    n: int, digits: int, seed: int, exclude: set[tuple[int, int]] | None = None
) -> list[AdditionProblem]:
    """``n`` distinct problems with operands uniform in [0, 10**digits), none of them in ``exclude``."""
    space = 10**digits
    if n > space * space // 2:
        raise ValueError(f"cannot draw {n} distinct {digits}-digit problems")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[AdditionProblem] = []
    while len(out) < n:
        a, b = rng.randrange(space), rng.randrange(space)
        if (a, b) not in seen:
            seen.add((a, b))
            out.append(AdditionProblem(a, b, digits))
    return out


def extract_answer(response: str) -> str | None:
    """The final answer of a response: the digits after its last '='; None when it does not end in one."""
    text = response.strip()
    if ANSWER_MARK not in text:
        return None
    tail = text.rsplit(ANSWER_MARK, 1)[1]
    return tail if tail.isdigit() else None


def check_answer(response: str, gold: str) -> bool:
    """Exact match of the response's final answer with the gold sum (the width must match too)."""
    pred = extract_answer(response)
    return pred is not None and pred == gold.strip()
