"""The SGLang scorer's parsing, against a stand-in HTTP server on 127.0.0.1 that answers prefill-only /generate
requests in SGLang's format from a known table of teacher logprobs: every returned value lands at its sample and
position as a float32 (what the hand-over used to make of the Python floats), as the documented tensor types, for
each top-K strategy; the id checks still refuse a misaligned answer. (The real server is in
tests/e2e/test_sglang_engine.py.)"""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from megatron_opd.rollout.sglang_client import SGLangClient
from megatron_opd.rollout.types import RolloutError
from megatron_opd.teacher.sglang_scorer import SGLangScorer

V = 50  # the served vocabulary: SGLang reports id V - 1 as 0 in input_token_logprobs (module doc of the scorer)
K = 3


def table(p: int, tok: int) -> float:
    """The stand-in teacher's log p of ``tok`` at input position ``p`` (distinct values, not float32-exact)."""
    return -(((p * 31 + tok * 17) % 97) + 0.1) / 13.0


def teacher_topk(p: int) -> list[int]:
    return [(p + 7 * k) % V for k in range(K)]


def answer(payload: dict, *, shift: int = 0, drop: int = 0) -> dict:
    """SGLang's prefill-only answer: one entry per input position from ``logprob_start_len`` on, the first null.
    ``shift`` corrupts the reported token ids (a misaligned server); ``drop`` leaves out the first ``drop`` ids of
    ``token_ids_logprob`` (a server that did not score every id asked)."""
    ids, start = payload["input_ids"], payload["logprob_start_len"]
    meta: dict = {"input_token_logprobs": [[None, ids[start], None]]}
    for p in range(start + 1, len(ids)):
        tok = ids[p]
        meta["input_token_logprobs"].append([table(p, tok), (0 if tok == V - 1 else tok) + shift, None])
    positions = range(start + 1, len(ids))
    if "top_logprobs_num" in payload:
        meta["input_top_logprobs"] = [None] + [
            [[table(p, t), t, None] for t in teacher_topk(p)] for p in positions
        ]
    if "token_ids_logprob" in payload:
        rng = random.Random(start)
        rows = [None]
        for p in positions:
            row = [[table(p, t), t, None] for t in payload["token_ids_logprob"][drop:]]
            rng.shuffle(row)  # any order: the scorer looks each student id up
            rows.append(row)
        meta["input_token_ids_logprobs"] = rows
    return {"meta_info": meta}


class _Server:
    def __init__(self, **kw):
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(handler):
                body = json.dumps(
                    answer(json.loads(handler.rfile.read(int(handler.headers["Content-Length"]))), **kw)
                )
                self.requests += 1
                data = body.encode()
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _batch():
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 2, 3], [4], [5, 6]]
    responses = [torch.randint(0, V, (n,), generator=g) for n in (9, 0, 14)]
    responses[2][4] = V - 1  # the relabelled last id must be accepted
    student = [torch.randint(0, V, (len(r), K), generator=g) for r in responses]
    return prompts, responses, student


def _want(prompts, responses, ids=None):
    """The table's values at each response token (or at ``ids`` [T, K]) as float32 [T] ([T, K])."""
    out = []
    for p, r, x in zip(prompts, responses, ids or [None] * len(prompts)):
        pos = [len(p) + t for t in range(len(r))]
        if x is None:
            out.append(torch.tensor([table(q, int(tok)) for q, tok in zip(pos, r)], dtype=torch.float32))
        else:
            rows = [[table(q, int(tok)) for tok in row] for q, row in zip(pos, torch.as_tensor(x).tolist())]
            out.append(torch.tensor(rows, dtype=torch.float32).reshape(len(r), K))
    return out


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("strategy", ["none", "teacher", "student"])
def test_scores_are_the_servers_values_as_per_sample_tensors(strategy):
    prompts, responses, student = _batch()
    topk = 0 if strategy == "none" else K
    kw = {} if strategy == "none" else {"topk": K, "strategy": strategy}
    if strategy == "student":
        kw["student_topk_ids"] = student
    with _Server() as srv:
        # max_ids_per_request 4 < 14 x 3 ids: strategy 'student' cuts each response into several runs
        scorer = SGLangScorer(SGLangClient([srv.url], max_concurrency=4), max_ids_per_request=4, vocab_size=V)
        got = scorer.score(prompts, responses, **kw)
        # lists in (hand-built requests) give the same scores
        lists = scorer.score(
            prompts,
            [r.tolist() for r in responses],
            **{
                **kw,
                **({"student_topk_ids": [s.tolist() for s in student]} if strategy == "student" else {}),
            },
        )
    if strategy == "student":
        assert srv.requests > 2 * 2  # several runs per non-empty response, in both calls
    got.validate(responses, topk=topk)
    assert _equal(got.logprobs, _want(prompts, responses))
    assert _equal(lists.logprobs, got.logprobs)
    if strategy == "none":
        assert got.topk_ids is None and got.topk_logprobs is None
        return
    ids = (
        student
        if strategy == "student"
        else [
            torch.tensor([teacher_topk(len(p) + t) for t in range(len(r))], dtype=torch.long).reshape(
                len(r), K
            )
            for p, r in zip(prompts, responses)
        ]
    )
    assert _equal(got.topk_ids, ids)
    assert _equal(got.topk_logprobs, _want(prompts, responses, ids))
    assert _equal(lists.topk_logprobs, got.topk_logprobs)


def test_a_misaligned_answer_is_refused_naming_the_position():
    prompts, responses, _ = _batch()
    with _Server(shift=1) as srv:
        scorer = SGLangScorer(SGLangClient([srv.url]), vocab_size=V)
        with pytest.raises(RolloutError, match=r"sample 0 position 0 scored token"):
            scorer.score(prompts[:1], responses[:1])


def test_a_student_id_missing_from_the_answer_is_refused():
    prompts, responses, student = _batch()
    with _Server(drop=1) as srv:
        scorer = SGLangScorer(SGLangClient([srv.url]), vocab_size=V)
        with pytest.raises(RolloutError, match="lacks a student id"):
            scorer.score(prompts[:1], responses[:1], topk=K, strategy="student", student_topk_ids=student[:1])


def test_numpy_lookup_matches_a_dictionary_lookup():
    """``_pick`` (sorted rows + one searchsorted) against the per-position dictionary it replaced."""
    from megatron_opd.teacher.sglang_scorer import _pick

    rng = np.random.default_rng(0)
    T, W = 40, 12
    ids = np.stack([rng.permutation(1000)[:W] for _ in range(T)])
    lps = rng.normal(size=(T, W)).astype(np.float32)
    want = np.stack([rng.choice(row, K, replace=False) for row in ids])
    by_id = [dict(zip(i.tolist(), lp.tolist())) for i, lp in zip(ids, lps)]
    expect = np.array([[by_id[t][v] for v in want[t]] for t in range(T)], dtype=np.float32)
    assert np.array_equal(_pick(ids, lps, want, 0, 0), expect)
