"""Every seed a run derives from ``train.seed``, in one place.

Why it exists: exact resume and side-by-side comparisons need each random stream (data order, rollout sampling,
evaluation sampling) to be a pure function of the run's seed and a position in the stream (epoch, step, sample),
and two streams must not collide. Written out at each use, the same mixing drifted into four spellings; here each
stream has one function, and the values are those the project has always used (so runs stay comparable).
"""

from __future__ import annotations

_STRIDE = 1_000_003  # a prime larger than any index used: (base, index) pairs map to distinct seeds
_MAX = 2**63


def derive_seed(base: int, index: int) -> int:
    """The seed of item ``index`` (epoch, step, sample) of the stream seeded by ``base``, in [0, 2**63)."""
    return (base * _STRIDE + index) % _MAX


def evaluation_seed(train_seed: int, step: int) -> int:
    """The seed of the evaluation after ``step`` optimizer steps (every evaluator of a run uses it, so a
    checkpoint evaluated later, or a peer's student at the same step, sees the same samples)."""
    return train_seed + 17 * step
