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

SGLang 0.5.23 relabels the LAST vocabulary id (``vocab_size - 1``) as 0 in ``input_token_logprobs``
(``x if x < vocab_size - 1 else 0`` in its logprob_result_processor; the logprob value itself is that of the real
id). The per-position id check accepts exactly that relabelling; ``vocab_size`` comes from the served model's
config.json (``/model_info``) at ``probe``, or the constructor. Unknown, any id reported as 0 is accepted (the
entry count still pins the alignment).
"""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_opd.rollout.sglang_client import SGLangClient, redact_url
from megatron_opd.rollout.types import RolloutError
from megatron_opd.teacher.scorer import TeacherScores, TopKStrategy, check_score_request

__all__ = ["SGLangScorer", "plan_runs"]


def plan_runs(topk_ids: list[list[int]], max_ids: int) -> list[tuple[int, int, list[int]]]:
    """Cut positions into consecutive runs [start, end) whose id union has at most max(max_ids, K) ids.

    topk_ids: [T][K] -> [(start, end, sorted union ids)], covering 0..T in order.
    """
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

    def _same_token(self, reported: int, want: int) -> bool:
        if reported == want:
            return True
        return reported == 0 and (self.vocab_size is None or want == self.vocab_size - 1)

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
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        *,
        topk: int = 0,
        strategy: TopKStrategy = "student",
        student_topk_ids: list[list[list[int]]] | None = None,
    ) -> TeacherScores:
        check_score_request(prompt_ids, response_ids, topk, strategy, student_topk_ids)
        # One request per (sample, run); a run is the whole response unless strategy 'student' needs several.
        jobs: list[tuple[int, int, int, list[int]]] = []
        for i, r in enumerate(response_ids):
            if topk > 0 and strategy == "student":
                jobs += [(i, s, e, u) for s, e, u in plan_runs(student_topk_ids[i], self.max_ids_per_request)]
            elif r:
                jobs.append((i, 0, len(r), []))
        payloads = []
        for i, s, e, union in jobs:
            p: dict[str, Any] = {
                "input_ids": list(prompt_ids[i]) + list(response_ids[i][:e]),
                "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                "return_logprob": True,
                "logprob_start_len": len(prompt_ids[i]) + s - 1,
            }
            if topk > 0 and strategy == "teacher":
                p["top_logprobs_num"] = topk
            elif topk > 0:
                p["token_ids_logprob"] = union
            payloads.append(p)
        outs = self.client.map("/generate", payloads)

        lps: list[list[float]] = [[0.0] * len(r) for r in response_ids]
        tk_ids = [[None] * len(r) for r in response_ids] if topk > 0 else None
        tk_lps = [[None] * len(r) for r in response_ids] if topk > 0 else None
        for (i, s, e, _), out in zip(jobs, outs):
            meta = out.get("meta_info") or {}
            toks = _entries(meta, "input_token_logprobs", e - s)
            for t, entry in enumerate(toks):
                if not self._same_token(int(entry[1]), response_ids[i][s + t]):
                    raise RolloutError(
                        f"SGLang scoring: sample {i} position {s + t} scored token {entry[1]}, "
                        f"not {response_ids[i][s + t]}"
                    )
                lps[i][s + t] = float(entry[0])
            if topk > 0 and strategy == "teacher":
                for t, top in enumerate(_entries(meta, "input_top_logprobs", e - s)):
                    tk_ids[i][s + t] = [int(x[1]) for x in top[:topk]]
                    tk_lps[i][s + t] = [float(x[0]) for x in top[:topk]]
            elif topk > 0:
                for t, got in enumerate(_entries(meta, "input_token_ids_logprobs", e - s)):
                    by_id = {int(x[1]): float(x[0]) for x in got}
                    want = student_topk_ids[i][s + t]
                    if any(v not in by_id for v in want):
                        raise RolloutError(f"SGLang scoring: sample {i} position {s + t} lacks a student id")
                    tk_ids[i][s + t] = list(want)
                    tk_lps[i][s + t] = [by_id[v] for v in want]
        return TeacherScores(logprobs=lps, topk_ids=tk_ids, topk_logprobs=tk_lps)
