"""The shipped benchmarks load by name, their gold answers are checkable, and custom sets load by path."""

import json

import pytest

from megatron_opd.data import DataError
from megatron_opd.eval.benchmarks import BENCHMARKS, MATH_PROMPT_TEMPLATE, load_eval_set
from megatron_opd.eval.checkers import math_verify_checker

SIZES = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_shipped_sets_load_by_name(name):
    s = load_eval_set(name)
    assert len(s) == SIZES[name] and s.checker is math_verify_checker
    assert s.prompts()[0] == MATH_PROMPT_TEMPLATE.format(problem=s.problems[0])
    assert s.prompts()[0].endswith("within \\boxed{}.")
    assert len(load_eval_set(name, max_problems=3)) == 3


@pytest.mark.parametrize("name", ["aime24", "aime25", "amc23"])
def test_every_gold_answer_verifies_against_itself_boxed(name):
    s = load_eval_set(name)
    assert all(math_verify_checker(f"... so \\boxed{{{a}}}", a) for a in s.answers)


def test_custom_path_with_checker_prefix(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text(json.dumps({"prompt": "a1+A2:", "answer": "03"}) + "\n")
    s = load_eval_set(f"toy_addition:{p}")
    assert s.name == "toy_addition_mine" and s.prompts() == ["a1+A2:"] and s.checker("a1+A2+0=03;=03", "03")
    m = load_eval_set(str(p))
    assert m.checker is math_verify_checker and m.prompt_template == MATH_PROMPT_TEMPLATE


def test_missing_set_and_bad_row(tmp_path):
    with pytest.raises(DataError, match="no such eval set"):
        load_eval_set("aime26")
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n" + json.dumps({"problem": "y"}) + "\n")
    with pytest.raises(DataError, match="row 2"):
        load_eval_set(str(p))
