"""In-process teacher scoring with the embedded decoder: one prefill per batch of (prompt + response) sequences.

Why it exists: the CPU default keeps the teacher in the trainer's process (no server). Sequences are right-padded
and run in chunks of at most ``max_tokens_per_batch`` padded tokens; logits are then made per sample in blocks of
``logits_block`` positions, so at most [logits_block, V] fp32 logits exist at a time (V = 152k for Qwen). The math
(log-softmax, gathers, top-K with its tie-breaking) is ``loss/reference.py``'s, the same the trainer uses.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_opd.loss import reference
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

    def response_hidden(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(sample index, final hidden states [len(response_i), hidden] predicting each response token).

        A generator over chunks of at most ``max_tokens_per_batch`` padded tokens, in sample order.
        """
        seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
        start = 0
        while start < len(seqs):
            end, longest = start, 0
            while end < len(seqs):
                longest2 = max(longest, len(seqs[end]))
                if end > start and longest2 * (end - start + 1) > self.max_tokens_per_batch:
                    break
                longest, end = longest2, end + 1
            yield from enumerate(self._chunk_hidden(prompt_ids[start:end], seqs[start:end], longest), start)
            start = end

    def response_logits(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(sample index, fp32 logits [len(response_i), V]); one sample's logits alive at a time."""
        for i, h in self.response_hidden(prompt_ids, response_ids):
            yield i, self.decoder.logits(h, self.vocab_size)

    @torch.no_grad()
    def _chunk_hidden(self, prompts: list[list[int]], seqs: list[list[int]], L: int) -> list[torch.Tensor]:
        dev = self.decoder.device
        B = len(seqs)
        ids = torch.zeros((B, L), dtype=torch.long, device=dev)
        valid = torch.zeros((B, L), dtype=torch.bool, device=dev)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            valid[b, : len(s)] = True
        pos = torch.arange(L, device=dev)[None].expand(B, L)
        # Right padding: in causal order, pads come after every valid token and are never attended to.
        hidden = self.decoder.forward(ids, pos, valid)
        return [hidden[b, len(prompts[b]) - 1 : len(seqs[b]) - 1] for b in range(B)]

    @torch.no_grad()
    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        *,
        topk: int = 0,
        strategy: TopKStrategy = "student",
        student_topk_ids: list[list[list[int]]] | None = None,
    ) -> TeacherScores:
        check_score_request(prompt_ids, response_ids, topk, strategy, student_topk_ids)
        lps: list[list[float]] = []
        tk_ids: list[list[list[int]]] | None = [] if topk > 0 else None
        tk_lps: list[list[list[float]]] | None = [] if topk > 0 else None
        for i, hidden in self.response_hidden(prompt_ids, response_ids):
            lp_i, ids_i, tlp_i = [], [], []
            # Logits in blocks of positions: [block, V] fp32 at a time, however long the response.
            for s in range(0, hidden.shape[0], self.logits_block):
                logits = self.decoder.logits(hidden[s : s + self.logits_block], self.vocab_size)
                target = torch.tensor(response_ids[i][s : s + self.logits_block], device=logits.device)
                lp_i += reference.token_logprobs(logits, target).tolist()
                if topk > 0:
                    if strategy == "teacher":
                        ids = reference.topk_ids(logits, topk)
                    else:
                        ids = torch.tensor(
                            student_topk_ids[i][s : s + self.logits_block], device=logits.device
                        )
                        ids = ids.view(-1, topk)
                    ids_i += ids.tolist()
                    tlp_i += reference.logprobs_at(logits, ids).tolist()
            lps.append(lp_i)
            if topk > 0:
                tk_ids.append(ids_i)
                tk_lps.append(tlp_i)
        return TeacherScores(logprobs=lps, topk_ids=tk_ids, topk_logprobs=tk_lps)
