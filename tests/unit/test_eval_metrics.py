"""avg@k and the unbiased pass@k estimator against brute-force enumeration."""

import itertools
import math

import pytest

from megatron_opd.eval.metrics import avg_at_k, default_ks, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    "n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 4), (6, 6, 2), (7, 1, 7), (4, 3, 2)]
)
def test_pass_at_k_equals_enumeration_over_subsets(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)  # float product vs exact ratio
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_1_is_the_mean_accuracy_and_avg():
    correct, n = [0, 3, 16, 5], 16
    assert mean_pass_at_k(correct, n, 1) == pytest.approx(avg_at_k(correct, n), abs=1e-12)
    assert avg_at_k(correct, n) == pytest.approx(24 / 64)
    assert mean_pass_at_k(correct, n, 16) == pytest.approx(3 / 4)


def test_invalid_arguments_and_default_ks():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]
