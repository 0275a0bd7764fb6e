"""The SGLang rollout backend: student sampling on SGLang servers through the native ``/generate`` API.

Why it exists: at scale the student's rollouts run on SGLang servers; this engine turns a batch of prompt token
ids into ``RolloutResult`` with the same semantics as the embedded engine. One request per sample (they are
independent, and many in flight keep every server busy); the batch is all-or-nothing (``SGLangClient.map``).

Semantics kept equal to the embedded engine:
- logprobs are temperature-1 (the launcher sets ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``; a server started elsewhere
  must set it too, or use temperature 1);
- a response stopped by EOS ends with the EOS token ("stop"), one cut by ``max_new_tokens`` is "length";
- ``topk`` > 0 asks ``top_logprobs_num`` and returns the student's top-K ids per response token.
Not kept: ``seed``. SGLang samples with its own per-server RNG unless a server runs with
``--enable-deterministic-inference``; ``seed`` is then sent as ``sampling_seed`` (``deterministic=True``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from megatron_opd.rollout.sglang_client import SGLangClient
from megatron_opd.rollout.types import RolloutError, RolloutResult, check_generate_args
from megatron_opd.utils.seeding import derive_seed

__all__ = ["SGLangEngine", "parse_generation"]


def parse_generation(
    out: dict[str, Any], max_new_tokens: int, want_topk: int
) -> tuple[list, list, str, list]:
    """(response ids, logprobs, finish reason, top-K ids) of one ``/generate`` answer; raises on anything malformed."""
    meta = out.get("meta_info") or {}
    fin = meta.get("finish_reason") or {}
    kind = fin.get("type") if isinstance(fin, dict) else fin
    if kind not in ("stop", "length"):
        raise RolloutError(f"SGLang generation ended with finish_reason={fin!r}")
    entries = meta.get("output_token_logprobs") or []
    ids = [int(e[1]) for e in entries]
    if out.get("output_ids") is not None and list(out["output_ids"]) != ids:
        raise RolloutError("SGLang output_ids disagree with output_token_logprobs")
    if len(ids) > max_new_tokens or (kind == "length" and len(ids) != max_new_tokens):
        raise RolloutError(f"SGLang returned {len(ids)} tokens for max_new_tokens={max_new_tokens} ({kind})")
    lps = [float(e[0]) for e in entries]
    tks: list[list[int]] = []
    if want_topk:
        tops = meta.get("output_top_logprobs") or []
        if len(tops) != len(ids) or any(len(t) < want_topk for t in tops):
            raise RolloutError("SGLang top logprobs do not cover every response token")
        tks = [[int(e[1]) for e in t[:want_topk]] for t in tops]
    return ids, lps, kind, tks


class SGLangEngine:
    """``RolloutEngine`` over SGLang servers. ``weight_sync`` (``rollout/sglang_weights.py``) serves
    ``update_weights``; without one, ``update_weights`` raises."""

    def __init__(self, client: SGLangClient, *, weight_sync=None, deterministic: bool = False):
        self.client = client
        self.weight_sync = weight_sync
        self.deterministic = deterministic

    def update_weights(self, named_tensors: Iterable) -> float:
        """Push HF-named tensors (or buckets) to every server, flush their caches. Returns seconds."""
        if self.weight_sync is None:
            raise RuntimeError("SGLangEngine was built without a weight sync")
        t0 = time.perf_counter()
        self.weight_sync.sync(named_tensors)
        return time.perf_counter() - t0

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
        check_generate_args(n, max_new_tokens)
        index = [i for i in range(len(prompts)) for _ in range(n)]
        payloads = []
        for j, i in enumerate(index):
            sp: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
            }
            if self.deterministic:
                sp["sampling_seed"] = derive_seed(seed, j)
            p: dict[str, Any] = {"input_ids": list(prompts[i]), "sampling_params": sp, "return_logprob": True}
            if topk > 0:
                p["top_logprobs_num"] = topk
            payloads.append(p)
        outs = self.client.map("/generate", payloads)
        ids, lps, fins, tks = [], [], [], []
        for out in outs:
            a, b, c, d = parse_generation(out, max_new_tokens, topk)
            ids.append(a)
            lps.append(b)
            fins.append(c)
            tks.append(d)
        res = RolloutResult(
            prompt_index=index,
            prompt_ids=[list(prompts[i]) for i in index],
            response_ids=ids,
            logprobs=lps,
            finish_reasons=fins,
            topk_ids=tks if topk > 0 else None,
        )
        res.validate()
        return res
