"""What the teacher returns for a batch of student rollouts, and the interface every teacher backend implements.

Why it exists: OPD needs, per response token, the teacher's log p of the sampled token (the log-ratio r_t) and,
for the top-K KL term, the teacher's logprobs on a K-token set per position: the student's top-K ids (the paper's
default, strategy "student") or the teacher's own top-K (strategy "teacher"). Backends (embedded, SGLang) differ in
how they compute it, not in what they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from megatron_opd.rollout.types import RolloutError, check_per_token

__all__ = ["TeacherScores", "TeacherScorer", "check_score_request"]

TopKStrategy = Literal["student", "teacher"]


@dataclass
class TeacherScores:
    """Per sample i and response position t (same layout as ``RolloutResult.response_ids``).

    Types (what every scorer returns): ``logprobs[i]`` float32 CPU tensor [T_i]; ``topk_ids[i]`` int64 CPU tensor
    [T_i, K]; ``topk_logprobs[i]`` float32 CPU tensor [T_i, K] (``validate`` also accepts lists, hand-built).

    ``logprobs[i][t]``: teacher log p(response_ids[i][t] | prompt, response[:t]), temperature 1, over the teacher
    tokenizer's vocabulary. ``topk_ids[i][t]``: the K ids of the set S_t (the student's given ids, or the
    teacher's K most likely), ``topk_logprobs[i][t][k]``: the teacher's log p of ``topk_ids[i][t][k]``. Both None
    when ``topk == 0``.
    """

    logprobs: list[torch.Tensor]
    topk_ids: list[torch.Tensor] | None = None
    topk_logprobs: list[torch.Tensor] | None = None

    def validate(self, response_ids: Sequence[Sequence[int]], topk: int = 0) -> None:
        """Raise RolloutError unless every field covers every token of ``response_ids`` (with ``topk`` K ids and
        logprobs per token when ``topk`` > 0; top-K must then be present, and absent when ``topk`` is 0)."""
        if len(self.logprobs) != len(response_ids):
            raise RolloutError(f"{len(self.logprobs)} scored samples for {len(response_ids)} responses")
        if (self.topk_ids is None) != (topk == 0) or (self.topk_logprobs is None) != (topk == 0):
            raise RolloutError(f"top-K scores {'missing' if topk else 'unexpected'} (topk={topk})")
        for i, r in enumerate(response_ids):
            check_per_token("teacher logprobs", i, self.logprobs[i], len(r), torch.float32)
            if topk:
                check_per_token("teacher top-K ids", i, self.topk_ids[i], len(r), torch.long, topk)
                check_per_token(
                    "teacher top-K logprobs", i, self.topk_logprobs[i], len(r), torch.float32, topk
                )


class TeacherScorer(Protocol):
    def score(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int] | torch.Tensor],
        *,
        topk: int = 0,
        strategy: TopKStrategy = "student",
        student_topk_ids: Sequence[Sequence[Sequence[int]] | torch.Tensor] | None = None,
    ) -> TeacherScores:
        """Score every response (prefill only); raises rather than return a partially scored batch.

        Per-sample inputs may be lists or tensors (``RolloutResult``'s: response ids int64 [T_i], student top-K
        ids int64 [T_i, K])."""
        ...


def check_score_request(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int] | torch.Tensor],
    topk: int,
    strategy: str,
    student_topk_ids: Sequence[Sequence[Sequence[int]] | torch.Tensor] | None,
) -> None:
    """Shared argument checks of ``TeacherScorer.score`` (raise ValueError on a malformed request)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(response_ids)} responses")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt: the first response token would have no context")
    if strategy not in ("student", "teacher"):
        raise ValueError(f"unknown top-K strategy {strategy!r}")
    if topk > 0 and strategy == "student":
        if student_topk_ids is None or len(student_topk_ids) != len(response_ids):
            raise ValueError("strategy 'student' needs student_topk_ids for every sample")
        for i, (ids, r) in enumerate(zip(student_topk_ids, response_ids)):
            if isinstance(ids, torch.Tensor):  # shape only: no per-row Python loop over a long response
                bad = tuple(ids.shape) != (len(r), topk)
            else:
                bad = len(ids) != len(r) or any(len(k) != topk for k in ids)
            if bad:
                raise ValueError(f"sample {i}: student_topk_ids must be [len(response)][{topk}]")
