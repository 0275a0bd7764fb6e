"""One rank's share of a batch of rollouts, as the training step consumes it.

Why it exists: the rollout engine and the teacher produce ragged lists (prompts, responses, per-token teacher
logprobs, optional top-K); the trainer wants dense tensors padded only to the batch's real length (truncated
horizons make sequences short, so padding to T_max would waste most of the step). ``OPDBatch`` is that
hand-over, with the horizon window travelling alongside so the loss mask can never disagree with the schedule.

Layout: sequence b is ``tokens[b, :P_b + R_b]`` = prompt (P_b ids) then response (R_b ids), right-padded.
Response position j of sequence b is token ``tokens[b, P_b + j]``; its logprob is read from the logits at
position ``P_b + j - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from megatron_opd.algorithms.horizon import HorizonWindow


def _pad_2d(rows: Sequence[Sequence[float]], width: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(row, dtype=dtype)
    return out


def _pad_3d(rows: Sequence, width: int, k: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width, k), value, dtype=dtype)
    for i, row in enumerate(rows):
        row_t = torch.as_tensor(row, dtype=dtype).reshape(-1, k)
        out[i, : row_t.shape[0]] = row_t
    return out


@dataclass
class OPDBatch:
    """Rollouts of one rank, padded to the batch's real length (module doc for the layout).

    Attributes:
        tokens: [B, L] int64 prompt + response ids, right-padded (L = longest prompt + response, not T_max).
        prompt_lengths: [B] int64.
        response_lengths: [B] int64.
        teacher_logprobs: [B, R] float32 teacher log p of response token j (R = longest response), or None when
            the training step computes them itself (teacher.backend 'megatron': the teacher runs inside the step).
        window: response positions [start, end) distilled.
        topk_ids: [B, R, K] int64 ids of the top-K KL (the student's top-K from the rollout engine, or the
            teacher's), or None.
        teacher_topk_logprobs: [B, R, K] float32 teacher logprobs at ``topk_ids``, or None.
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    teacher_logprobs: torch.Tensor | None
    window: HorizonWindow
    topk_ids: torch.Tensor | None = None
    teacher_topk_logprobs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        B = self.tokens.shape[0]
        if self.prompt_lengths.shape != (B,) or self.response_lengths.shape != (B,):
            raise ValueError("prompt_lengths and response_lengths must be [B] for tokens [B, L]")
        if int((self.prompt_lengths < 1).sum()):
            raise ValueError(
                "every prompt needs at least one token (the first response token is predicted from it)"
            )
        if B and int((self.prompt_lengths + self.response_lengths).max()) > self.tokens.shape[1]:
            raise ValueError("tokens [B, L] is shorter than prompt + response for some sequence")
        if self.teacher_logprobs is not None and (
            self.teacher_logprobs.shape[0] != B
            or (B and self.teacher_logprobs.shape[1] < int(self.response_lengths.max()))
        ):
            raise ValueError("teacher_logprobs must be [B, R] with R >= the longest response")
        if (self.topk_ids is None) != (self.teacher_topk_logprobs is None):
            raise ValueError("topk_ids and teacher_topk_logprobs go together (both or neither)")
        if self.topk_ids is not None and self.topk_ids.shape != self.teacher_topk_logprobs.shape:
            raise ValueError("topk_ids and teacher_topk_logprobs must both be [B, R, K]")

    @classmethod
    def from_lists(
        cls,
        prompts: list[list[int]],
        responses: list[list[int]] | list[torch.Tensor],
        teacher_logprobs: list[list[float]] | list[torch.Tensor] | None,
        window: HorizonWindow,
        topk_ids: list | torch.Tensor | None = None,
        teacher_topk_logprobs: list | torch.Tensor | None = None,
        pad_id: int = 0,
    ) -> OPDBatch:
        """Pad ragged rollouts into an ``OPDBatch``. Per-sequence inputs may be lists or tensors (what the engines
        return: response ids int64 [R_b], logprobs float32 [R_b], top-K [R_b, K]).
        ``teacher_logprobs`` None: the step scores (teacher.backend 'megatron')."""
        if (
            not len(prompts)
            == len(responses)
            == len(responses if teacher_logprobs is None else teacher_logprobs)
        ):
            raise ValueError("prompts, responses and teacher_logprobs must have one entry per rollout")
        for b, (r, t) in enumerate(zip(responses, teacher_logprobs or [])):
            if len(t) < len(r):
                raise ValueError(f"rollout {b}: {len(t)} teacher logprobs for {len(r)} response tokens")
        seqs = [
            torch.cat([torch.as_tensor(p, dtype=torch.long), torch.as_tensor(r, dtype=torch.long)])
            for p, r in zip(prompts, responses)
        ]
        L = max((len(s) for s in seqs), default=1)
        R = max((len(r) for r in responses), default=1)
        R = max(R, 1)
        ids = tids = None
        if (topk_ids is None) != (teacher_topk_logprobs is None):
            raise ValueError("topk_ids and teacher_topk_logprobs go together (both or neither)")
        if topk_ids is not None:
            shapes = [torch.as_tensor(x).shape for x, r in zip(topk_ids, responses) if len(r)]
            k = int(shapes[0][-1]) if shapes else 1
            ids = _pad_3d(
                [torch.as_tensor(x)[: len(r)] for x, r in zip(topk_ids, responses)], R, k, 0, torch.long
            )
            tids = _pad_3d(
                [torch.as_tensor(x)[: len(r)] for x, r in zip(teacher_topk_logprobs, responses)],
                R,
                k,
                0.0,
                torch.float32,
            )
        return cls(
            tokens=_pad_2d(seqs, L, pad_id, torch.long),
            prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
            response_lengths=torch.tensor([len(r) for r in responses], dtype=torch.long),
            teacher_logprobs=None
            if teacher_logprobs is None
            else _pad_2d(
                [
                    torch.as_tensor(t, dtype=torch.float32)[: len(r)]
                    for t, r in zip(teacher_logprobs, responses)
                ],
                R,
                0.0,
                torch.float32,
            ),
            window=window,
            topk_ids=ids,
            teacher_topk_logprobs=tids,
        )

    @property
    def response_width(self) -> int:
        """R, the padded response length of the [B, R] per-token tensors."""
        if self.teacher_logprobs is not None:
            return self.teacher_logprobs.shape[1]
        return max(int(self.response_lengths.max()) if self.size else 1, 1)

    @property
    def size(self) -> int:
        """Number of sequences B."""
        return self.tokens.shape[0]

    def response_mask(self) -> torch.Tensor:
        """[B, R] bool: real response tokens inside the horizon window."""
        R = self.response_width
        real = torch.arange(R).unsqueeze(0) < self.response_lengths.unsqueeze(1)
        return self.window.mask(real)

    def num_distilled_tokens(self) -> int:
        """How many tokens this batch contributes to the loss."""
        return int(self.response_mask().sum())

    def num_distilled_sequences(self) -> int:
        """How many sequences have at least one distilled token."""
        return int((self.response_mask().sum(-1) > 0).sum())

    def select(self, index: torch.Tensor | Sequence[int]) -> OPDBatch:
        """The sub-batch of the given rows, re-trimmed to its own real length."""
        index = torch.as_tensor(index, dtype=torch.long)
        P, Rl = self.prompt_lengths[index], self.response_lengths[index]
        L = max(int((P + Rl).max()) if len(index) else 1, 1)
        R = max(int(Rl.max()) if len(index) else 1, 1)
        return replace(
            self,
            tokens=self.tokens[index, :L],
            prompt_lengths=P,
            response_lengths=Rl,
            teacher_logprobs=None if self.teacher_logprobs is None else self.teacher_logprobs[index, :R],
            topk_ids=None if self.topk_ids is None else self.topk_ids[index, :R],
            teacher_topk_logprobs=None
            if self.teacher_topk_logprobs is None
            else self.teacher_topk_logprobs[index, :R],
        )

    def split(self, n: int) -> list[OPDBatch]:
        """``n`` micro-batches of B / n consecutive sequences, each padded to its own real length."""
        if n < 1 or self.size % n:
            raise ValueError(f"cannot split a batch of {self.size} sequences into {n} equal micro-batches")
        m = self.size // n
        return [self.select(range(i * m, (i + 1) * m)) for i in range(n)]

    def shard(self, rank: int, world: int) -> OPDBatch:
        """Data-parallel rank ``rank``'s contiguous share of a global batch (B divisible by ``world``)."""
        if self.size % world:
            raise ValueError(
                f"a batch of {self.size} sequences does not split over {world} data-parallel ranks"
            )
        m = self.size // world
        return self.select(range(rank * m, (rank + 1) * m))

    def trimmed_to_window(self) -> OPDBatch:
        """Drop tokens after the window's end: causal attention means they cannot change distilled logprobs."""
        keep = self.response_lengths.clamp(max=self.window.end)
        L = max(int((self.prompt_lengths + keep).max()), 1)
        R = max(int(keep.max()), 1)
        return replace(
            self,
            tokens=self.tokens[:, :L],
            response_lengths=keep,
            teacher_logprobs=None if self.teacher_logprobs is None else self.teacher_logprobs[:, :R],
            topk_ids=None if self.topk_ids is None else self.topk_ids[:, :R],
            teacher_topk_logprobs=None
            if self.teacher_topk_logprobs is None
            else self.teacher_topk_logprobs[:, :R],
        )

    def response_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For response position j of sequence b: (index of the logits that predict it [B, R], its token id [B, R]).

        Positions past a sequence's end are clamped to valid indices; mask them with ``response_mask``.
        """
        R = self.response_width
        j = torch.arange(R).unsqueeze(0)
        logit_pos = (self.prompt_lengths.unsqueeze(1) - 1 + j).clamp(max=self.tokens.shape[1] - 1)
        target_pos = (logit_pos + 1).clamp(max=self.tokens.shape[1] - 1)
        return logit_pos, torch.gather(self.tokens, 1, target_pos)
