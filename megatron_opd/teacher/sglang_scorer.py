"""Teacher scoring on SGLang servers: prefill-only ``/generate`` requests (``max_new_tokens: 0``).

Why it exists: at scale the teacher is an SGLang server; scoring a rollout is one prefill of prompt + response with
``return_logprob`` and ``logprob_start_len = len(prompt) - 1``. The answer's ``input_token_logprobs`` then holds
one entry per position from that index on; the first is null (that token has no context here) and the rest are
the teacher's log p of each response token.

Top-K, strategy "teacher": ``top_logprobs_num = K``; ``input_top_logprobs`` (same layout) gives the teacher's top-K.

Top-K, strategy "student" (the paper's default): the teacher's logprobs at the student's K ids, which change at
every position. SGLang's ``token_ids_logprob`` takes ONE id list per request, scored at every position. One request
per position would be T prefills per sample; instead the response positions are cut into consecutive runs whose
union of student ids stays under ``max_ids_per_request``, one request per run (prompt + response up to the run's
end, ``logprob_start_len`` at the run's start), and each position picks its own K ids out of the union's answer.
The run's prefix is served from SGLang's radix cache, so a run costs about its own tokens plus |union| x run length
returned logprobs. With repeated tokens the union is far below run x K. (``return_hidden_states`` plus the
teacher's LM head in the trainer would serve any id set without this, but moves [T, hidden] per sample; not done.)

Every response is scored completely or the call raises (``SGLangClient.map``): never a half-scored sample.
Each answer's JSON becomes arrays (``logprob_arrays``), is checked and is written into its sample's slice in the
client's worker thread that received it, while other requests are still in flight; the scores are per-sample
CPU tensors.

SGLang 0.5.23 relabels the LAST vocabulary id (``vocab_size - 1``) as 0 in ``input_token_logprobs``
(``x if x < vocab_size - 1 else 0`` in its logprob_result_processor; the logprob value itself is that of the real
id). The per-position id check accepts exactly that relabelling; ``vocab_size`` comes from the served model's
config.json (``/model_info``) at ``probe``, or the constructor. Unknown, any id reported as 0 is accepted (the
entry count still pins the alignment).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron_opd.rollout.sglang_client import SGLangClient, logprob_arrays, redact_url
from megatron_opd.rollout.types import RolloutError, token_list
from megatron_opd.teacher.scorer import TeacherScores, TopKStrategy, check_score_request

__all__ = ["SGLangScorer", "plan_runs"]


def plan_runs(
    topk_ids: Sequence[Sequence[int]] | np.ndarray | torch.Tensor, max_ids: int
) -> list[tuple[int, int, list[int]]]:
    """Cut positions into consecutive runs [start, end) whose id union has at most max(max_ids, K) ids.

    topk_ids: [T][K] (lists, or an int array/tensor [T, K]) -> [(start, end, sorted union ids)], covering 0..T
    in order.
    """
    if isinstance(topk_ids, np.ndarray | torch.Tensor):
        topk_ids = topk_ids.tolist()  # Python ints: a 0-d tensor would hash by identity in the sets below
    runs: list[tuple[int, int, list[int]]] = []
    start, union = 0, set()
    for t, ids in enumerate(topk_ids):
        merged = union | set(ids)
        if t > start and len(merged) > max_ids:
            runs.append((start, t, sorted(union)))
            start, merged = t, set(ids)
        union = merged
    if topk_ids:
        runs.append((start, len(topk_ids), sorted(union)))
    return runs


def _entries(meta: dict[str, Any], key: str, expect: int) -> list:
    got = meta.get(key)
    if got is None or len(got) != expect + 1:
        n = None if got is None else len(got)
        raise RolloutError(f"SGLang scoring: {key} has {n} entries, expected {expect + 1}")
    return got[1:]  # the first entry (position logprob_start_len) has no context and is null


class SGLangScorer:
    """``TeacherScorer`` over SGLang servers (see the module docstring)."""

    def __init__(
        self, client: SGLangClient, *, max_ids_per_request: int = 256, vocab_size: int | None = None
    ):
        self.client = client
        self.max_ids_per_request = max_ids_per_request
        self.vocab_size = vocab_size

    def _served_vocab_size(self) -> int | None:
        """``vocab_size`` of the model the first server serves, when its config.json is readable from here."""
        try:
            info = self.client.get("/model_info", url=self.client.urls[0]).json()
            with open(os.path.join(str(info["model_path"]), "config.json"), encoding="utf-8") as f:
                return int(json.load(f)["vocab_size"])
        except Exception:  # noqa: BLE001 - optional: without it the id check is only looser
            return None

    def probe(self, topk: int, strategy: TopKStrategy) -> None:
        """Start-up check that the servers return what ``strategy`` needs (raises RolloutError if not)."""
        p: dict[str, Any] = {
            "input_ids": [2, 3, 4],
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        key = None
        if topk > 0 and strategy == "teacher":
            p["top_logprobs_num"], key = topk, "input_top_logprobs"
        elif topk > 0:
            p["token_ids_logprob"], key = [2, 3], "input_token_ids_logprobs"
        if self.vocab_size is None:
            self.vocab_size = self._served_vocab_size()
        for url in self.client.urls:
            meta = self.client.post("/generate", p, url=url).get("meta_info", {})
            if len(meta.get("input_token_logprobs") or []) != 3 or (key and len(meta.get(key) or []) != 3):
                raise RolloutError(
                    f"SGLang teacher server {redact_url(url)} cannot serve teacher scoring with top-K strategy {strategy!r} "
                    f"(no per-position {key or 'input_token_logprobs'} in a prefill-only answer)"
                )

    def score(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int] | torch.Tensor],
        *,
        topk: int = 0,
        strategy: TopKStrategy = "student",
        student_topk_ids: Sequence[Sequence[Sequence[int]] | torch.Tensor] | None = None,
    ) -> TeacherScores:
        """``TeacherScorer.score``: per-sample CPU tensors (``TeacherScores``), lists or tensors in. Each answer
        is checked and written into its sample's arrays in the worker thread that received it."""
        check_score_request(prompt_ids, response_ids, topk, strategy, student_topk_ids)
        student = topk > 0 and strategy == "student"
        responses = [_array(r, np.int64) for r in response_ids]
        given = [_array(x, np.int64).reshape(-1, topk) for x in student_topk_ids] if student else None
        # One request per (sample, run); a run is the whole response unless strategy 'student' needs several.
        jobs: list[tuple[int, int, int, list[int]]] = []
        for i, r in enumerate(responses):
            if student:
                jobs += [(i, s, e, u) for s, e, u in plan_runs(given[i], self.max_ids_per_request)]
            elif len(r):
                jobs.append((i, 0, len(r), []))
        payloads = []
        for i, s, e, union in jobs:
            p: dict[str, Any] = {
                "input_ids": token_list(prompt_ids[i]) + responses[i][:e].tolist(),
                "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                "return_logprob": True,
                "logprob_start_len": len(prompt_ids[i]) + s - 1,
            }
            if topk > 0 and strategy == "teacher":
                p["top_logprobs_num"] = topk
            elif topk > 0:
                p["token_ids_logprob"] = union
            payloads.append(p)

        # Every position of every sample is written by exactly one job (the runs cover 0..T), so empty is safe.
        lps = [np.empty(len(r), dtype=np.float32) for r in responses]
        tk_ids = [np.empty((len(r), topk), dtype=np.int64) for r in responses] if topk > 0 else None
        tk_lps = [np.empty((len(r), topk), dtype=np.float32) for r in responses] if topk > 0 else None

        def parse(j: int, out: dict[str, Any]) -> None:
            i, s, e, _ = jobs[j]
            meta = out.get("meta_info") or {}
            lp, got = logprob_arrays(_entries(meta, "input_token_logprobs", e - s), "input_token_logprobs")
            want = responses[i][s:e]
            same = (got == want) | ((got == 0) & (want == self.vocab_size - 1 if self.vocab_size else True))
            if not same.all():
                t = int(np.argmin(same))
                raise RolloutError(
                    f"SGLang scoring: sample {i} position {s + t} scored token {got[t]}, not {want[t]}"
                )
            lps[i][s:e] = lp
            if topk > 0 and strategy == "teacher":
                tl, ti = logprob_arrays(
                    _entries(meta, "input_top_logprobs", e - s), "input_top_logprobs", topk
                )
                tk_ids[i][s:e], tk_lps[i][s:e] = ti, tl
            elif topk > 0:
                rows = _entries(meta, "input_token_ids_logprobs", e - s)
                tl, ti = logprob_arrays(rows, "input_token_ids_logprobs", len(rows[0]) if rows else 0)
                tk_ids[i][s:e] = given[i][s:e]
                tk_lps[i][s:e] = _pick(ti, tl, given[i][s:e], i, s)

        self.client.map("/generate", payloads, parse=parse)
        as_tensors = (lambda xs: [torch.from_numpy(x) for x in xs]) if topk > 0 else (lambda xs: None)
        return TeacherScores(
            logprobs=[torch.from_numpy(x) for x in lps],
            topk_ids=as_tensors(tk_ids),
            topk_logprobs=as_tensors(tk_lps),
        )


def _array(x: Sequence | torch.Tensor, dtype: type) -> np.ndarray:
    """A list or CPU tensor as a numpy array (a tensor's is shared, not copied)."""
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=dtype)


def _pick(ids: np.ndarray, lps: np.ndarray, want: np.ndarray, sample: int, start: int) -> np.ndarray:
    """Per position t, the logprobs at ``want[t]`` [T, K] out of the answered (``ids``, ``lps``) [T, W].

    Vectorised lookup: each row's ids sorted, rows made disjoint by adding ``t * M`` (M above every id), so one
    ``searchsorted`` over the flattened rows finds every wanted id; a wanted id missing from its row raises."""
    T, W = ids.shape
    if W == 0:
        raise RolloutError(f"SGLang scoring: sample {sample} position {start} lacks a student id")
    order = np.argsort(ids, axis=1, kind="stable")
    M = int(max(ids.max(), want.max())) + 1
    offset = np.arange(T, dtype=np.int64)[:, None] * M
    keys = (np.take_along_axis(ids, order, 1) + offset).ravel()
    query = (want + offset).ravel()
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    found = keys[pos] == query
    if not found.all():
        t = int(np.argmin(found)) // want.shape[1]
        raise RolloutError(f"SGLang scoring: sample {sample} position {start + t} lacks a student id")
    return np.take_along_axis(lps, order, 1).ravel()[pos].reshape(want.shape)
