"""The toy task: formats, the arithmetic of the trace, the exact-match checker, problem sampling."""

import random

import pytest

from megatron_opd.toy.addition import (
    AdditionProblem,
    alphabet,
    check_answer,
    extract_answer,
    make_problems,
    response_length,
)


def test_the_documented_example():
    p = AdditionProblem(472, 3856, 4)
    assert p.prompt == "d0c4b7a2+D3C8B5A6:"
    assert p.teacher_response() == "a2+A6+0=08;b7+B5+0=12;c4+C8+1=13;d0+D3+1=04;=04328"
    assert p.shortcut_response() == "=04328" and p.answer == "04328"
    assert len(p.teacher_response()) == response_length(4)
    assert set(p.prompt + p.teacher_response()) <= set(alphabet(4))


@pytest.mark.parametrize("digits", [1, 2, 3, 5])
def test_trace_answers_are_the_sums(digits):
    rng = random.Random(digits)
    for _ in range(200):
        p = AdditionProblem(rng.randrange(10**digits), rng.randrange(10**digits), digits)
        r = p.teacher_response()
        assert len(r) == response_length(digits)
        assert int(extract_answer(r)) == p.a + p.b and check_answer(r, p.answer)
        assert check_answer(p.shortcut_response(), p.answer)


def test_dropped_carry_gives_a_wrong_answer():
    p = AdditionProblem(472, 3856, 4)
    sloppy = p.steps({2})  # the carry into the hundreds is lost: 4+8+0=12
    assert (
        "c4+C8+0=12;" in sloppy and extract_answer(sloppy) == "04228" and not check_answer(sloppy, p.answer)
    )


@pytest.mark.parametrize(
    "response, ok",
    [
        ("=04328", True),
        ("...;=04328 ", True),
        ("=4328", False),
        ("=04329", False),
        ("a2+A6+0=08;", False),
        ("", False),
    ],
)
def test_checker_is_exact_on_the_final_answer(response, ok):
    assert check_answer(response, "04328") is ok


def test_make_problems_distinct_deterministic_and_excluding():
    a = make_problems(300, 2, seed=5)
    assert a == make_problems(300, 2, seed=5) and len({(p.a, p.b) for p in a}) == 300
    b = make_problems(300, 2, seed=6, exclude={(p.a, p.b) for p in a})
    assert not {(p.a, p.b) for p in a} & {(p.a, p.b) for p in b}
    with pytest.raises(ValueError):
        alphabet(11)
