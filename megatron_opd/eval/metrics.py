"""avg@k and pass@k from per-problem correct counts.

Why it exists: the paper reports avg@16 (the mean accuracy of 16 samples per problem); pass@k is the
probability that at least one of k samples is right, estimated without bias from n >= k samples with c correct
as 1 - C(n-c, k) / C(n, k) (Chen et al., 2021), computed as a stable product.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` of ``n`` samples correct (needs 1 <= k <= n, 0 <= c <= n)."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(correct: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over problems; ``correct[i]`` is problem i's number of correct samples out of ``n``."""
    return sum(pass_at_k(n, c, k) for c in correct) / len(correct)


def avg_at_k(correct: Sequence[int], n: int) -> float:
    """avg@n: the mean over problems of the fraction of correct samples."""
    return sum(correct) / (n * len(correct))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]
