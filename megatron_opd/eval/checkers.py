"""Answer checkers: does a response's final answer match the ground truth?

Why it exists: every evaluation (the paper's math benchmarks, the toy task, a user's own set) reduces to one
question per response, and the answer to it must be the same wherever it is asked. Math answers are the
content of the response's LAST ``\\boxed{...}`` (the format R1-style models are prompted for), compared with
the gold by ``math-verify`` (symbolic equality: ``0.5`` == ``\\frac{1}{2}``); a response with no box is wrong.
Other tasks register their own checker by name (``register_checker``), e.g. the toy task's exact match.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Checker = Callable[[str, str], bool]
"""``checker(response_text, gold_answer) -> correct``."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; else None.

    ``\\boxed 5`` (no braces, one token) is accepted as well, as some models write it.
    """
    best: tuple[int, str] | None = None
    for cmd in _BOX_COMMANDS:
        start = text.rfind(cmd)
        while start != -1:
            content = _box_content(text, start + len(cmd))
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content)
                break
            start = text.rfind(cmd, 0, start)
    return None if best is None else best[1]


def _box_content(text: str, i: int) -> str | None:
    if i < len(text) and text[i] == " ":
        rest = text[i + 1 :].split(maxsplit=1)
        return rest[0].rstrip("$.") if rest else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the response was cut inside the box


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def parse_gold(gold: str) -> list:
    """The gold answer parsed by math-verify (tried as LaTeX math first, then as plain text)."""
    from math_verify import parse

    t = _timeout()
    parsed = parse(f"${gold}$", parsing_timeout=t)
    return parsed if parsed else parse(gold, parsing_timeout=t)


def math_verify_checker(response: str, gold: str) -> bool:
    """True when the last boxed answer of ``response`` equals ``gold`` under math-verify."""
    from math_verify import parse, verify

    boxed = extract_boxed(response)
    if boxed is None or not boxed.strip():
        return False
    t = _timeout()
    pred = parse("\\boxed{" + boxed + "}", parsing_timeout=t)
    gold_parsed = parse_gold(gold)
    if not pred or not gold_parsed:
        return boxed.strip() == gold.strip()
    return bool(verify(gold_parsed, pred, timeout_seconds=t))


def exact_match_checker(response: str, gold: str) -> bool:
    """The response (stripped) equals the gold (stripped)."""
    return response.strip() == gold.strip()


_CHECKERS: dict[str, Checker] = {"math": math_verify_checker, "exact": exact_match_checker}


def register_checker(name: str, checker: Checker) -> None:
    """Make ``checker`` available to eval set specs as ``name:path`` (see ``benchmarks.load_eval_set``)."""
    _CHECKERS[name] = checker


def get_checker(name: str) -> Checker:
    _register_builtin_tasks()
    if name not in _CHECKERS:
        raise KeyError(f"unknown answer checker '{name}'; known: {', '.join(sorted(_CHECKERS))}")
    return _CHECKERS[name]


def checker_names() -> list[str]:
    _register_builtin_tasks()
    return sorted(_CHECKERS)


def _register_builtin_tasks() -> None:
    # The toy task's checker lives with the task; import it lazily so eval does not depend on toy at import.
    if "toy_addition" not in _CHECKERS:
        from megatron_opd.toy.addition import check_answer

        _CHECKERS["toy_addition"] = check_answer
