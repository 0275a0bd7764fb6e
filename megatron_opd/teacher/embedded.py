"""In-process teacher scoring with the embedded decoder: one prefill per batch of (prompt + response) sequences.

Why it exists: the CPU default keeps the teacher in the trainer's process (no server). Sequences are right-padded
and run in chunks of at most ``max_tokens_per_batch`` padded tokens; the response positions of a chunk are then
gathered into one [N, hidden] tensor and turned into logits in blocks of ``logits_block`` positions, so at most
[logits_block, V] fp32 logits exist at a time (V = 152k for Qwen) and the per-token work is a few tensor ops per
block, not per sample (on the CPU main job scoring is dominated by per-op overhead, not arithmetic). The math
(log-softmax, gathers, top-K with its tie-breaking) is ``loss/reference.py``'s, the same the trainer uses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from megatron_opd.loss import reference
from megatron_opd.parallel.cpu_compat import without_redirects
from megatron_opd.rollout.decoder import Decoder
from megatron_opd.rollout.embedded import read_tokenizer_vocab_size
from megatron_opd.teacher.scorer import TeacherScores, TopKStrategy, check_score_request

__all__ = ["EmbeddedScorer"]


class EmbeddedScorer:
    """``TeacherScorer`` over a ``Decoder``; logits are sliced to ``vocab_size`` (the tokenizer's vocabulary)."""

    def __init__(
        self,
        decoder: Decoder,
        *,
        vocab_size: int | None = None,
        max_tokens_per_batch: int = 16384,
        logits_block: int = 1024,
    ):
        self.decoder = decoder
        self.vocab_size = vocab_size or decoder.cfg.vocab_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.logits_block = logits_block

    @classmethod
    def from_hf_dir(
        cls, path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **kw
    ) -> EmbeddedScorer:
        kw.setdefault("vocab_size", read_tokenizer_vocab_size(path))
        return cls(Decoder.from_hf_dir(path, dtype=dtype, device=device), **kw)

    def _chunks(self, lengths: list[int]) -> Iterator[tuple[int, int, int]]:
        """(start, end, longest): consecutive samples (of ``lengths`` tokens) of at most ``max_tokens_per_batch``
        padded tokens."""
        start = 0
        while start < len(lengths):
            end, longest = start, 0
            while end < len(lengths):
                longest2 = max(longest, lengths[end])
                if end > start and longest2 * (end - start + 1) > self.max_tokens_per_batch:
                    break
                longest, end = longest2, end + 1
            yield start, end, longest
            start = end

    def response_hidden(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int] | torch.Tensor]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(sample index, final hidden states [len(response_i), hidden] predicting each response token).

        A generator over chunks of at most ``max_tokens_per_batch`` padded tokens, in sample order.
        """
        seqs = _sequences(prompt_ids, response_ids)
        for start, end, longest in self._chunks([len(q) for q in seqs]):
            hidden = self._chunk_hidden(seqs[start:end], longest)
            for b in range(end - start):
                yield start + b, hidden[b, len(prompt_ids[start + b]) - 1 : len(seqs[start + b]) - 1]

    def response_logits(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int] | torch.Tensor]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(sample index, fp32 logits [len(response_i), V]); one sample's logits alive at a time."""
        for i, h in self.response_hidden(prompt_ids, response_ids):
            yield i, self.decoder.logits(h, self.vocab_size)

    @torch.no_grad()
    def _chunk_hidden(self, seqs: list[torch.Tensor], L: int) -> torch.Tensor:
        """Final hidden states of right-padded ``seqs`` (int64 [len_b] each): [len(seqs), L, hidden]."""
        dev = self.decoder.device
        B = len(seqs)
        ids = torch.zeros((B, L), dtype=torch.long)
        for b, q in enumerate(seqs):
            ids[b, : len(q)] = q
        ids = ids.to(dev)
        lens = torch.tensor([len(q) for q in seqs], device=dev)
        pos = torch.arange(L, device=dev)[None].expand(B, L)
        valid = pos < lens[:, None]
        # Right padding: in causal order, pads come after every valid token and are never attended to.
        return self.decoder.forward(ids, pos, valid)

    @without_redirects
    @torch.no_grad()
    def score(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int] | torch.Tensor],
        *,
        topk: int = 0,
        strategy: TopKStrategy = "student",
        student_topk_ids: Sequence[Sequence[Sequence[int]] | torch.Tensor] | None = None,
    ) -> TeacherScores:
        """``TeacherScorer.score``: per-sample CPU tensors (``TeacherScores``), lists or tensors in."""
        check_score_request(prompt_ids, response_ids, topk, strategy, student_topk_ids)
        lengths = [len(r) for r in response_ids]
        seqs = _sequences(prompt_ids, response_ids)
        lp_parts: list[torch.Tensor] = []
        ids_parts: list[torch.Tensor] = []
        tlp_parts: list[torch.Tensor] = []
        for start, end, longest in self._chunks([len(q) for q in seqs]):
            hidden = self._chunk_hidden(seqs[start:end], longest)
            dev = hidden.device
            # Every response position of the chunk in one [N, hidden] tensor (sample order): the LM head and the
            # log-softmax then run once per block of positions, not once per sample.
            rows = torch.cat(
                [
                    b * longest + torch.arange(len(prompt_ids[start + b]) - 1, len(seqs[start + b]) - 1)
                    for b in range(end - start)
                ]
            )
            flat = hidden.reshape(-1, hidden.shape[-1])[rows.to(dev)]
            targets = torch.cat([_ids(r) for r in response_ids[start:end]]).to(dev)
            student_ids = None
            if topk > 0 and strategy == "student":
                student_ids = torch.cat([_ids(x).reshape(-1, topk) for x in student_topk_ids[start:end]]).to(
                    dev
                )
            # Logits in blocks of positions: [block, V] fp32 at a time, however many tokens the chunk holds.
            for s in range(0, flat.shape[0], self.logits_block):
                logits = self.decoder.logits(flat[s : s + self.logits_block], self.vocab_size)
                lp_parts.append(reference.token_logprobs(logits, targets[s : s + self.logits_block]))
                if topk > 0:
                    if strategy == "teacher":
                        ids = reference.topk_ids(logits, topk)
                    else:
                        ids = student_ids[s : s + self.logits_block]
                    ids_parts.append(ids)
                    tlp_parts.append(reference.logprobs_at(logits, ids))
        lps = _split(lp_parts, lengths, (), torch.float32)
        if topk == 0:
            return TeacherScores(logprobs=lps, topk_ids=None, topk_logprobs=None)
        return TeacherScores(
            logprobs=lps,
            topk_ids=_split(ids_parts, lengths, (topk,), torch.long),
            topk_logprobs=_split(tlp_parts, lengths, (topk,), torch.float32),
        )


def _ids(x: Sequence | torch.Tensor) -> torch.Tensor:
    """Token ids (a list, nested list or tensor) as an int64 CPU tensor."""
    return torch.as_tensor(x, dtype=torch.long)


def _sequences(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int] | torch.Tensor]
) -> list[torch.Tensor]:
    """prompt + response of every sample, int64 [len_b] each."""
    return [torch.cat([_ids(p), _ids(r)]) for p, r in zip(prompt_ids, response_ids)]


def _split(parts: list[torch.Tensor], lengths: list[int], row: tuple[int, ...], dtype: torch.dtype) -> list:
    """Cut the concatenated per-token ``parts`` into per-sample CPU tensors [lengths[i], *row] of ``dtype``, each
    owning its storage (a view would keep, and pickle, the whole batch)."""
    flat = torch.cat(parts).cpu().to(dtype) if parts else torch.empty((0, *row), dtype=dtype)
    return [t.clone() for t in flat.split(lengths)]
