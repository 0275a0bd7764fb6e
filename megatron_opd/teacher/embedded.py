"""In-process teacher scoring with the embedded decoder: one prefill per batch of (prompt + response) sequences.

Why it exists: the CPU default keeps the teacher in the trainer's process (no server). Sequences are right-padded
and scored in chunks of at most ``max_tokens_per_batch`` padded tokens, so [tokens, V] logits stay bounded. The math
(log-softmax, gathers, top-K with its tie-breaking) is ``loss/reference.py``'s, the same the trainer uses.
"""

from __future__ import annotations

import torch

from megatron_opd.loss import reference
from megatron_opd.rollout.decoder import Decoder
from megatron_opd.rollout.embedded import read_tokenizer_vocab_size
from megatron_opd.teacher.scorer import TeacherScores, TopKStrategy, check_score_request

__all__ = ["EmbeddedScorer"]


class EmbeddedScorer:
    """``TeacherScorer`` over a ``Decoder``; logits are sliced to ``vocab_size`` (the tokenizer's vocabulary)."""

    def __init__(self, decoder: Decoder, *, vocab_size: int | None = None, max_tokens_per_batch: int = 16384):
        self.decoder = decoder
        self.vocab_size = vocab_size or decoder.cfg.vocab_size
        self.max_tokens_per_batch = max_tokens_per_batch

    @classmethod
    def from_hf_dir(
        cls, path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **kw
    ) -> EmbeddedScorer:
        kw.setdefault("vocab_size", read_tokenizer_vocab_size(path))
        return cls(Decoder.from_hf_dir(path, dtype=dtype, device=device), **kw)

    def response_logits(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]]
    ) -> list[torch.Tensor]:
        """fp32 logits predicting each response token: one [len(response_i), V] tensor per sample."""
        out: list[torch.Tensor] = []
        seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
        start = 0
        while start < len(seqs):
            end, longest = start, 0
            while end < len(seqs):
                longest2 = max(longest, len(seqs[end]))
                if end > start and longest2 * (end - start + 1) > self.max_tokens_per_batch:
                    break
                longest, end = longest2, end + 1
            out += self._chunk_logits(prompt_ids[start:end], seqs[start:end], longest)
            start = end
        return out

    @torch.no_grad()
    def _chunk_logits(self, prompts: list[list[int]], seqs: list[list[int]], L: int) -> list[torch.Tensor]:
        dev = self.decoder.device
        B = len(seqs)
        ids = torch.zeros((B, L), dtype=torch.long, device=dev)
        valid = torch.zeros((B, L), dtype=torch.bool, device=dev)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            valid[b, : len(s)] = True
        pos = torch.arange(L, device=dev)[None].expand(B, L)
        hidden = self.decoder.forward(
            ids, pos, valid
        )  # right padding: causal order keeps pads out of valid rows
        res = []
        for b in range(B):
            p, n = len(prompts[b]), len(seqs[b]) - len(prompts[b])
            res.append(self.decoder.logits(hidden[b, p - 1 : p - 1 + n], self.vocab_size))
        return res

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
        for i, logits in enumerate(self.response_logits(prompt_ids, response_ids)):
            target = torch.tensor(response_ids[i], dtype=torch.long, device=logits.device)
            lps.append(reference.token_logprobs(logits, target).tolist())
            if topk > 0:
                if strategy == "teacher":
                    ids = reference.topk_ids(logits, topk)
                else:
                    ids = torch.tensor(student_topk_ids[i], dtype=torch.long, device=logits.device).view(
                        -1, topk
                    )
                tk_ids.append(ids.tolist())
                tk_lps.append(reference.logprobs_at(logits, ids).tolist())
        return TeacherScores(logprobs=lps, topk_ids=tk_ids, topk_logprobs=tk_lps)
