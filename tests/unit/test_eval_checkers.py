"""Answer checkers: the last boxed answer, math-verify equivalence, and the registry."""

import pytest

from megatron_opd.eval.checkers import exact_match_checker, extract_boxed, get_checker, math_verify_checker


@pytest.mark.parametrize(
    "text, expect",
    [
        ("so \\boxed{12}", "12"),
        ("first \\boxed{1} then \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),  # the last box, nested braces kept
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{7}", "7"),
        ("answer: \\boxed 5.", "5"),
        ("cut inside \\boxed{\\frac{1}{2}", None),  # unbalanced: the response was truncated in the box
        ("no box at all: 42", None),
    ],
)
def test_extract_boxed(text, expect):
    assert extract_boxed(text) == expect


@pytest.mark.parametrize(
    "response, gold, ok",
    [
        ("thus \\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\boxed{90}", "90^\\circ", True),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
        ("\\boxed{205}", "204", False),
        ("The answer is 204.", "204", False),  # no box: not accepted
        ("\\boxed{204} but then \\boxed{205}", "204", False),  # only the final box counts
    ],
)
def test_math_verify_checker(response, gold, ok):
    assert math_verify_checker(response, gold) is ok


def test_registry():
    assert get_checker("exact") is exact_match_checker
    assert get_checker("toy_addition")("a1+A2+0=03;=03", "03")
    with pytest.raises(KeyError, match="unknown answer checker"):
        get_checker("nope")
