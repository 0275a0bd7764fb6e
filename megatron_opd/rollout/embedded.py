"""The embedded rollout engine: batched in-process sampling on the student's weights, the CPU default.

Why it exists: a CPU run cannot afford an SGLang server per model, nor `transformers.generate`'s overheads; the
CPU main job should be dominated by learning. This engine samples a whole batch at once with a preallocated KV
cache (``rollout/decoder.py``), stops rows on EOS, drops finished rows from the batch (and the cache) once a
quarter of it has finished, and stops the loop when every row is done. It has the same
semantics as the SGLang backend (``RolloutResult``): temperature-1 logprobs of each sampled token, "stop"/"length"
finish reasons, the EOS token kept as the last response token.

Reproducibility: each ``generate`` call draws from its own ``torch.Generator`` seeded with ``seed``, so the same
call (same prompts, n, seed, weights) returns the same samples whatever ran before.

Vocabulary padding: checkpoints often pad the embedding to a multiple of 64/128 rows beyond the tokenizer's
vocabulary. Logits are sliced to ``vocab_size`` (the tokenizer's) before softmax, so a padded row is never sampled
and never takes probability mass; logprobs are normalised over the real vocabulary. A trainer whose logits span the
padded vocabulary must slice the same way for logprob parity.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence

import torch

from megatron_opd.loss import reference
from megatron_opd.parallel.cpu_compat import without_redirects
from megatron_opd.rollout.decoder import Decoder, KVCache
from megatron_opd.rollout.types import RolloutResult, check_generate_args, token_list

__all__ = ["EmbeddedEngine", "read_eos_token_ids", "read_tokenizer_vocab_size", "iter_named_tensors"]


def read_eos_token_ids(path: str) -> list[int]:
    """EOS ids of an HF directory: ``generation_config.json`` first, then ``config.json`` (int or list)."""
    for name in ("generation_config.json", "config.json"):
        f = os.path.join(path, name)
        if os.path.exists(f):
            with open(f, encoding="utf-8") as fh:
                eos = json.load(fh).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def read_tokenizer_vocab_size(path: str) -> int | None:
    """Number of ids the tokenizer can produce (``tokenizer.json`` via `tokenizers`), or None without one."""
    f = os.path.join(path, "tokenizer.json")
    if not os.path.exists(f):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(f).get_vocab_size(with_added_tokens=True)


def iter_named_tensors(
    named_or_buckets: Iterable[tuple[str, torch.Tensor]] | Iterable[list[tuple[str, torch.Tensor]]],
) -> Iterable[tuple[str, torch.Tensor]]:
    """Flatten either (name, tensor) pairs or buckets (lists of pairs) into pairs."""
    for item in named_or_buckets:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            yield item
        else:
            yield from item


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its temperature-1 logprob. logits [B, V] fp32 -> ([B] int64, [B] fp32).
    temperature 0 = greedy.

    Inverse-CDF sampling: one uniform per row located in the cumulative probabilities, so only B random numbers
    are drawn per step (``torch.multinomial`` and an exponential race both cost V per row on CPU, several times
    this). A zero-probability token (a top-p cut) has an empty CDF interval and is never picked. The logprob is
    z_y - logsumexp(z) of the raw logits (``reference.token_logprobs``' formula), whatever the temperature.
    """
    lse = torch.logsumexp(logits, -1, keepdim=True)  # [B, 1]
    if temperature == 0.0:
        idx = logits.argmax(-1, keepdim=True)
    else:
        probs = (logits - lse).exp_() if temperature == 1.0 else torch.softmax(logits / temperature, dim=-1)
        order = None
        if top_p < 1.0:
            probs, order = torch.sort(probs, dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            probs = probs.masked_fill((probs.cumsum(-1) - probs) >= top_p, 0.0)
        cdf = probs.cumsum(-1)
        u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
        idx = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True).clamp_(max=probs.shape[-1] - 1)
        if order is not None:
            idx = order.gather(-1, idx)
    return idx.squeeze(-1), (logits.gather(-1, idx) - lse).squeeze(-1)


class EmbeddedEngine:
    """In-process ``RolloutEngine`` over a ``Decoder`` (see the module docstring for semantics).

    ``max_batch_size`` bounds how many sequences share one KV cache (memory: 2 * layers * rows * kv_heads *
    (prompt + max_new_tokens) * head_dim values); larger batches are run in consecutive chunks, each with its own
    slice of the call's generator stream.
    """

    def __init__(
        self,
        decoder: Decoder,
        *,
        eos_token_ids: Sequence[int],
        vocab_size: int | None = None,
        pad_token_id: int = 0,
        max_batch_size: int = 256,
    ):
        self.decoder = decoder
        self.eos_token_ids = list(eos_token_ids)
        self.vocab_size = vocab_size or decoder.cfg.vocab_size
        if self.vocab_size > decoder.cfg.vocab_size:
            raise ValueError(f"tokenizer vocab {self.vocab_size} > embedding rows {decoder.cfg.vocab_size}")
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size

    @classmethod
    def from_hf_dir(
        cls, path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **kw
    ) -> EmbeddedEngine:
        kw.setdefault("eos_token_ids", read_eos_token_ids(path))
        kw.setdefault("vocab_size", read_tokenizer_vocab_size(path))
        return cls(Decoder.from_hf_dir(path, dtype=dtype, device=device), **kw)

    @without_redirects
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | Iterable[list]) -> float:
        """Copy HF-named tensors (or buckets of them) into the decoder in place. Returns seconds taken."""
        t0 = time.perf_counter()
        self.decoder.load(
            (n, t.to(device=self.decoder.device, dtype=self.decoder.dtype))
            for n, t in iter_named_tensors(named_tensors)
        )
        return time.perf_counter() - t0

    @without_redirects
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        topk: int = 0,
    ) -> RolloutResult:
        """Sample ``n`` responses per prompt, at most ``max_new_tokens`` each (the horizon H_k); per-token fields
        are CPU tensors (``RolloutResult``)."""
        check_generate_args(n, max_new_tokens)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        index = [i for i in range(len(prompts)) for _ in range(n)]
        rows = [token_list(prompts[i]) for i in index]
        gen = torch.Generator(device=self.decoder.device).manual_seed(seed)
        out_ids: list[torch.Tensor] = []
        out_lp: list[torch.Tensor] = []
        out_fin: list[str] = []
        out_topk: list[torch.Tensor] | None = [] if topk > 0 else None
        for s in range(0, len(rows), self.max_batch_size):
            ids, lps, fins, tks = self._generate_chunk(
                rows[s : s + self.max_batch_size], max_new_tokens, temperature, top_p, gen, topk
            )
            out_ids += ids
            out_lp += lps
            out_fin += fins
            if out_topk is not None:
                out_topk += tks
        return RolloutResult(
            prompt_index=index,
            prompt_ids=rows,
            response_ids=out_ids,
            logprobs=out_lp,
            finish_reasons=out_fin,
            topk_ids=out_topk,
        )

    def _generate_chunk(
        self,
        rows: list[list[int]],
        max_new: int,
        temperature: float,
        top_p: float,
        gen: torch.Generator,
        topk: int,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str], list[torch.Tensor]]:
        """(response ids int64 [T_b], logprobs float32 [T_b], finish reasons, top-K ids int64 [T_b, K]) per row,
        on the CPU."""
        dev = self.decoder.device
        B = len(rows)
        lens = torch.tensor([len(r) for r in rows], device=dev)
        Lp = int(lens.max())
        # Left padding: every row's last prompt token sits at column Lp - 1, so one decode step serves all rows.
        ids = torch.full((B, Lp), self.pad_token_id, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            ids[b, Lp - len(r) :] = torch.tensor(r, dtype=torch.long)
        col = torch.arange(Lp, device=dev)[None, :]
        pad = (Lp - lens)[:, None]
        key_valid = torch.zeros((B, Lp + max_new), dtype=torch.bool, device=dev)
        key_valid[:, :Lp] = col >= pad
        positions = (col - pad).clamp(min=0)
        cache = KVCache(self.decoder.cfg, B, Lp + max_new, self.decoder.dtype, dev)
        hidden = self.decoder.forward(ids, positions, key_valid, cache, 0)[:, -1]
        eos = torch.tensor(self.eos_token_ids or [-1], device=dev)
        # Buffers of the whole chunk (filled when rows leave the batch, and at the end) and of the rows still in it
        # (written with plain column copies each step; ``live`` maps them back to the chunk's rows).
        tok_buf = torch.zeros((B, max_new), dtype=torch.long, device=dev)
        lp_buf = torch.zeros((B, max_new), dtype=torch.float32, device=dev)
        tk_buf = torch.zeros((B, max_new, topk), dtype=torch.long, device=dev) if topk > 0 else None
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        length = torch.full((B,), max_new, dtype=torch.long, device=dev)
        live = torch.arange(B, device=dev)
        tok_l, lp_l, tk_l = tok_buf.clone(), lp_buf.clone(), None if tk_buf is None else tk_buf.clone()
        done_l, len_l = done.clone(), length.clone()
        # [b, 1]: the position of the token fed next (the first sampled token's is its prompt length).
        pos = lens[:, None].clone()

        def flush(rows: torch.Tensor | slice) -> None:
            """Copy the rows ``rows`` of the live buffers to their chunk rows."""
            at = live[rows]
            tok_buf[at], lp_buf[at], done[at], length[at] = tok_l[rows], lp_l[rows], done_l[rows], len_l[rows]
            if tk_buf is not None:
                tk_buf[at] = tk_l[rows]

        for t in range(max_new):
            logits = self.decoder.logits(hidden, self.vocab_size)  # [b, V] fp32, real vocabulary only
            nxt, lp = _sample(logits, temperature, top_p, gen)
            tok_l[:, t], lp_l[:, t] = nxt, lp
            if tk_l is not None:
                tk_l[:, t] = reference.topk_ids(logits, topk)
            stop_now = (nxt == eos[0] if len(eos) == 1 else torch.isin(nxt, eos)) & ~done_l
            len_l.masked_fill_(stop_now, t + 1)
            done_l |= stop_now
            n_done = int(done_l.sum())
            if n_done == len(live) or t == max_new - 1:
                break
            # Drop finished rows once a quarter of the batch has finished: the copy of the cache costs about one
            # decode step, and rows that stopped early then cost nothing. Until then they keep decoding; their
            # tokens are written past their length and never read.
            if n_done >= max(1, len(live) // 4):
                flush(done_l)
                keep = ~done_l
                live, nxt, pos, key_valid = live[keep], nxt[keep], pos[keep], key_valid[keep]
                tok_l, lp_l, done_l, len_l = tok_l[keep], lp_l[keep], done_l[keep], len_l[keep]
                tk_l = tk_l[keep] if tk_l is not None else None
                cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
            key_valid[:, Lp + t] = True  # the new token's own key: what decode_step=True relies on
            hidden = self.decoder.forward(nxt[:, None], pos, key_valid, cache, Lp + t, decode_step=True)
            hidden = hidden[:, -1]
            pos += 1
        flush(slice(None))
        # One device-to-host copy per buffer, then per-row clones: each sample owns its storage (a view would
        # keep, and pickle, the whole [B, max_new] buffer) and no per-token Python object is made.
        tok_buf, lp_buf, lengths = tok_buf.cpu(), lp_buf.cpu(), length.tolist()
        tk_buf = tk_buf.cpu() if tk_buf is not None else None
        out_ids = [tok_buf[b, : lengths[b]].clone() for b in range(B)]
        out_lp = [lp_buf[b, : lengths[b]].clone() for b in range(B)]
        fins = ["stop" if s else "length" for s in done.tolist()]
        out_tk = [tk_buf[b, : lengths[b]].clone() for b in range(B)] if tk_buf is not None else []
        return out_ids, out_lp, fins, out_tk
