"""Evaluation sets: the paper's shipped benchmarks by name, or any jsonl/parquet of problems by path.

Why it exists: evaluation must run the same sets the paper reports (AIME24, AIME25, AMC23 with avg@16; MATH-500
besides) without a download, and a user's or a task's own set with its own checker and prompt template.
A spec is one string, as written in ``eval.datasets``:
- ``aime24`` | ``aime25`` | ``amc23`` | ``math500``: the copies in ``eval/benchmarks/`` (see SOURCE.md there),
  checked with math-verify, prompted with ``MATH_PROMPT_TEMPLATE``;
- ``path/to/set.jsonl``: rows with ``problem`` (or ``prompt``) and ``answer``, math checker and template;
- ``CHECKER:path``: the same with a registered checker (``exact``, ``toy_addition``, ...) and the bare problem
  as the prompt, e.g. ``toy_addition:.cache/toy_models/<hash>/data/eval.jsonl``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_opd.data.prompts import validate_answer, validate_prompt
from megatron_opd.data.rows import DataError, iter_rows
from megatron_opd.eval.checkers import Checker, checker_names, get_checker

BENCHMARK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")
BENCHMARKS = ("aime24", "aime25", "amc23", "math500")
MATH_PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
"""The DeepSeek-R1 / JustRL evaluation instruction; the shipped problems carry no instruction of their own."""


@dataclass
class EvalSet:
    """Problems with gold answers, how to check a response, and how to turn a problem into a prompt."""

    name: str
    problems: list[str]
    answers: list[str]
    checker: Checker
    prompt_template: str = "{problem}"

    def __len__(self) -> int:
        return len(self.problems)

    def prompts(self) -> list[str]:
        return [self.prompt_template.format(problem=p) for p in self.problems]


def read_problems(path: str) -> tuple[list[str], list[str]]:
    """(problems, answers) of a file whose rows hold ``problem`` or ``prompt`` and ``answer``."""
    problems, answers = [], []
    for row_no, row in iter_rows(path):
        key = "problem" if "problem" in row else "prompt"
        if key not in row or "answer" not in row:
            raise DataError(
                path, row_no, f"an eval row needs 'problem' (or 'prompt') and 'answer' (keys: {sorted(row)})"
            )
        try:
            prompt = validate_prompt(row[key])
            answer = validate_answer(row["answer"])
        except ValueError as e:
            raise DataError(path, row_no, str(e)) from None
        if not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt)
        problems.append(prompt)
        answers.append(answer)
    if not problems:
        raise DataError(path, None, "the eval set has no rows")
    return problems, answers


def load_eval_set(
    spec: str, *, max_problems: int | None = None, prompt_template: str | None = None
) -> EvalSet:
    """The eval set named or located by ``spec`` (see the module docstring); the first ``max_problems`` only."""
    checker_name, path = "math", spec
    if spec in BENCHMARKS:
        name, path = spec, os.path.join(BENCHMARK_DIR, f"{spec}.jsonl")
    else:
        head, sep, tail = spec.partition(":")
        if sep and head in checker_names():
            checker_name, path = head, tail
        name = os.path.splitext(os.path.basename(path))[0]
        if sep and head in checker_names():
            name = f"{checker_name}_{name}"  # e.g. toy_addition_eval: the task, not just the file name
        if not os.path.exists(path):
            raise DataError(
                path,
                None,
                f"no such eval set; use a path or one of the shipped benchmarks: {', '.join(BENCHMARKS)}",
            )
    problems, answers = read_problems(path)
    if max_problems is not None:
        problems, answers = problems[:max_problems], answers[:max_problems]
    if prompt_template is None:
        prompt_template = MATH_PROMPT_TEMPLATE if checker_name == "math" else "{problem}"
    return EvalSet(name, problems, answers, get_checker(checker_name), prompt_template)
