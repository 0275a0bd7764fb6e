"""The SGLang rollout backend: student sampling on SGLang servers through the native ``/generate`` API.

Why it exists: at scale the student's rollouts run on SGLang servers; this engine turns a batch of prompt token
ids into ``RolloutResult`` with the same semantics as the embedded engine. One request per sample (they are
independent, and many in flight keep every server busy); the batch is all-or-nothing (``SGLangClient.map``).

Semantics kept equal to the embedded engine:
- logprobs are temperature-1 (the launcher sets ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``; a server started elsewhere
  must set it too, or use temperature 1);
- a response stopped by EOS ends with the EOS token ("stop"), one cut by ``max_new_tokens`` is "length";
- ``topk`` > 0 asks ``top_logprobs_num`` and returns the student's top-K ids per response token;
- per-token fields are CPU tensors, parsed from each answer's JSON in the worker thread that received it.
Not kept: ``seed``. SGLang samples with its own per-server RNG unless a server runs with
``--enable-deterministic-inference``; ``seed`` is then sent as ``sampling_seed`` (``deterministic=True``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from megatron_opd.rollout.sglang_client import SGLangClient, logprob_arrays
from megatron_opd.rollout.types import RolloutError, RolloutResult, check_generate_args, token_list
from megatron_opd.utils.seeding import derive_seed

__all__ = ["SGLangEngine", "parse_generation"]


def parse_generation(
    out: dict[str, Any], max_new_tokens: int, want_topk: int
) -> tuple[torch.Tensor, torch.Tensor, str, torch.Tensor | None]:
    """(response ids int64 [T], logprobs float32 [T], finish reason, top-K ids int64 [T, K] or None when
    ``want_topk`` is 0) of one ``/generate`` answer, as CPU tensors; raises on anything malformed.

    Called in the client's worker thread as each answer arrives (``SGLangClient.map``'s ``parse``), so the
    conversion overlaps with the requests still in flight.
    """
    meta = out.get("meta_info") or {}
    fin = meta.get("finish_reason") or {}
    kind = fin.get("type") if isinstance(fin, dict) else fin
    if kind not in ("stop", "length"):
        raise RolloutError(f"SGLang generation ended with finish_reason={fin!r}")
    lps, ids = logprob_arrays(meta.get("output_token_logprobs") or [], "output_token_logprobs")
    if out.get("output_ids") is not None and not np.array_equal(np.asarray(out["output_ids"]), ids):
        raise RolloutError("SGLang output_ids disagree with output_token_logprobs")
    if len(ids) > max_new_tokens or (kind == "length" and len(ids) != max_new_tokens):
        raise RolloutError(f"SGLang returned {len(ids)} tokens for max_new_tokens={max_new_tokens} ({kind})")
    tks = None
    if want_topk:
        tops = meta.get("output_top_logprobs") or []
        if len(tops) != len(ids) or any(len(t) < want_topk for t in tops):
            raise RolloutError("SGLang top logprobs do not cover every response token")
        tks = torch.from_numpy(logprob_arrays(tops, "output_top_logprobs", want_topk)[1])
    return torch.from_numpy(ids), torch.from_numpy(lps), kind, tks


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
            p: dict[str, Any] = {
                "input_ids": token_list(prompts[i]),
                "sampling_params": sp,
                "return_logprob": True,
            }
            if topk > 0:
                p["top_logprobs_num"] = topk
            payloads.append(p)
        # Each answer becomes tensors in the worker thread that received it (module doc of sglang_client).
        parsed = self.client.map(
            "/generate", payloads, parse=lambda _, out: parse_generation(out, max_new_tokens, topk)
        )
        res = RolloutResult(
            prompt_index=index,
            prompt_ids=[token_list(prompts[i]) for i in index],
            response_ids=[p[0] for p in parsed],
            logprobs=[p[1] for p in parsed],
            finish_reasons=[p[2] for p in parsed],
            topk_ids=[p[3] for p in parsed] if topk > 0 else None,
        )
        res.validate()
        return res
