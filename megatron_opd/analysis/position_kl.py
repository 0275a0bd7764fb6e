"""Per-position KL(student || teacher) over student rollouts: the paper's Fig. 13.

Why it exists: the case for horizon control rests on the teacher becoming less reliable deeper into the
student's rollout. This measures it directly: the student samples responses, both models score every response
position with their full next-token distributions, and the exact reverse KL is averaged per position (and per
equal-width bucket of [0, T)). Scoring goes through the ``TeacherScorer``-style ``response_logits`` of the
embedded scorer, so it is the distribution the trainer and teacher use, and log-partitions come from
``loss.reference``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_opd.loss import reference
from megatron_opd.rollout.engine import RolloutEngine


class LogitScorer(Protocol):
    def response_logits(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]] | list[torch.Tensor]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(sample index, fp32 logits [len(response_i), V]) in sample order."""
        ...


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)) per position; [N, V] x [N, V] -> [N] fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the two models must share a tokenizer vocabulary"
        )
    ls = student_logits.float() - reference.log_partition(student_logits).unsqueeze(-1)
    lt = teacher_logits.float() - reference.log_partition(teacher_logits).unsqueeze(-1)
    return (ls.exp() * (ls - lt)).sum(-1)


@dataclass
class PositionKL:
    """Per-position sums of the KL and token counts over all sampled responses."""

    sums: torch.Tensor
    """[T] float64 summed KL at each response position."""
    counts: torch.Tensor
    """[T] float64 number of responses that reach each position."""

    def means(self) -> list[float]:
        """Mean KL per position (NaN where no response is that long)."""
        return [s / c if c > 0 else math.nan for s, c in zip(self.sums.tolist(), self.counts.tolist())]

    def bucket_means(self, num_buckets: int) -> list[float]:
        """Token-weighted mean KL in each of ``num_buckets`` equal slices of [0, T)."""
        T = self.sums.shape[0]
        out = []
        for b in range(num_buckets):
            lo, hi = (b * T) // num_buckets, ((b + 1) * T) // num_buckets
            c = float(self.counts[lo:hi].sum())
            out.append(float(self.sums[lo:hi].sum()) / c if c > 0 else math.nan)
        return out


def accumulate_position_kl(
    student_logits: Iterable[tuple[int, torch.Tensor]],
    teacher_logits: Iterable[tuple[int, torch.Tensor]],
    T: int,
) -> PositionKL:
    """Sum the per-position KL of paired (index, logits) streams over responses of at most ``T`` tokens."""
    sums = torch.zeros(T, dtype=torch.float64)
    counts = torch.zeros(T, dtype=torch.float64)
    for (i, ls), (j, lt) in zip(student_logits, teacher_logits, strict=True):
        if i != j:
            raise ValueError(f"scorers returned samples out of step ({i} vs {j})")
        kl = full_reverse_kl(ls, lt).double().cpu()
        n = kl.shape[0]
        sums[:n] += kl
        counts[:n] += 1
    return PositionKL(sums, counts)


def position_kl(
    student_engine: RolloutEngine,
    student_scorer: LogitScorer,
    teacher_scorer: LogitScorer,
    prompts: list[list[int]],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> PositionKL:
    """Sample ``n`` student responses per prompt (up to ``max_new_tokens``) and measure the KL at each position."""
    ro = student_engine.generate(
        prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    s = student_scorer.response_logits(ro.prompt_ids, ro.response_ids)
    t = teacher_scorer.response_logits(ro.prompt_ids, ro.response_ids)
    return accumulate_position_kl(s, t, max_new_tokens)
