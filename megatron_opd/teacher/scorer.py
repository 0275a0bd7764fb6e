"""What the teacher returns for a batch of student rollouts, and the interface every teacher backend implements.

Why it exists: OPD needs, per response token, the teacher's log p of the sampled token (the log-ratio r_t) and,
for the top-K KL term, the teacher's logprobs on a K-token set per position: the student's top-K ids (the paper's
default, strategy "student") or the teacher's own top-K (strategy "teacher"). Backends (embedded, SGLang) differ in
how they compute it, not in what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["TeacherScores", "TeacherScorer", "check_score_request"]

TopKStrategy = Literal["student", "teacher"]


@dataclass
class TeacherScores:
    """Per sample i and response position t (same layout as ``RolloutResult.response_ids``).

    ``logprobs[i][t]``: teacher log p(response_ids[i][t] | prompt, response[:t]), temperature 1, over the teacher
    tokenizer's vocabulary. ``topk_ids[i][t]``: the K ids of the set S_t (the student's given ids, or the
    teacher's K most likely), ``topk_logprobs[i][t][k]``: the teacher's log p of ``topk_ids[i][t][k]``. Both None
    when ``topk == 0``.
    """

    logprobs: list[list[float]]
    topk_ids: list[list[list[int]]] | None = None
    topk_logprobs: list[list[list[float]]] | None = None


class TeacherScorer(Protocol):
    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        *,
        topk: int = 0,
        strategy: TopKStrategy = "student",
        student_topk_ids: list[list[list[int]]] | None = None,
    ) -> TeacherScores:
        """Score every response (prefill only); raises rather than return a partially scored batch."""
        ...


def check_score_request(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    topk: int,
    strategy: str,
    student_topk_ids: list[list[list[int]]] | None,
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
            if len(ids) != len(r) or any(len(k) != topk for k in ids):
                raise ValueError(f"sample {i}: student_topk_ids must be [len(response)][{topk}]")
