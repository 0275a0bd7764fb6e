"""Dead, hung, failing and wrong servers (issue 9), against the real SGLang client, engine and scorer code and a
tiny HTTP server on 127.0.0.1 that misbehaves on purpose: bounded retries with backoff, then an error naming the
server and the request; a batch is never returned partly done. (The real-SGLang cases, a server killed
mid-rollout and an unreachable URL, are in tests/e2e/test_sglang_engine.py and tests/unit/test_rollout_engine.py.)"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_opd.rollout.engine import check_served_model
from megatron_opd.rollout.sglang_client import SGLangClient
from megatron_opd.rollout.sglang_engine import SGLangEngine
from megatron_opd.rollout.types import RolloutError
from megatron_opd.teacher.sglang_scorer import SGLangScorer


def _generate_answer(payload: dict) -> dict:
    """A well-formed SGLang /generate answer: ``max_new_tokens`` tokens 7, 8, ... at logprob -1."""
    n = payload["sampling_params"]["max_new_tokens"]
    ids = [7 + t for t in range(n)]
    return {
        "output_ids": ids,
        "meta_info": {
            "finish_reason": {"type": "length"},
            "output_token_logprobs": [[-1.0, i, None] for i in ids],
        },
    }


class _Server:
    """``behave(handler, payload) -> (status, content_type, body)`` answers each POST; GETs go to ``get``."""

    def __init__(self, behave, get=None):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def _send(self, status, ctype, body):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(payload)
                result = behave(len(outer.requests) - 1, payload)
                if result is not None:
                    self._send(*result)

            def do_GET(self):
                self._send(*(get(self.path) if get else (404, "text/plain", "no")))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _ok(payload):
    return 200, "application/json", json.dumps(_generate_answer(payload))


def test_hung_server_times_out_each_attempt_and_names_the_server():
    release = threading.Event()

    def hang(i, p):
        release.wait(10)  # never answers within the client's timeout
        return None

    with _Server(hang) as srv:
        client = SGLangClient([srv.url], timeout_s=0.3, max_retries=1, backoff_s=0.05)
        t0 = time.monotonic()
        with pytest.raises(RolloutError, match=r"/generate failed after 2 attempts.*127\.0\.0\.1.*Timeout"):
            client.post("/generate", {"input_ids": [1]})
        elapsed = time.monotonic() - t0
        release.set()
    # 2 attempts x 0.3 s timeout + 0.05 s backoff; bounded well under a second of slack on a busy 2-core machine.
    assert 0.6 <= elapsed < 3.0
    assert len(srv.requests) == 2


def test_http_500_is_retried_with_exponential_backoff_then_fails_naming_the_server():
    with _Server(lambda i, p: (500, "text/plain", "internal error")) as srv:
        client = SGLangClient([srv.url], timeout_s=2, max_retries=3, backoff_s=0.05)
        t0 = time.monotonic()
        with pytest.raises(RolloutError, match=r"failed after 4 attempts; last error from http://127\.0\.0\.1:\d+: "
                           r"HTTPError: 500"):  # fmt: skip
            client.post("/generate", {"input_ids": [1]})
        elapsed = time.monotonic() - t0
    assert len(srv.requests) == 4
    assert elapsed >= 0.05 + 0.1 + 0.2  # backoff_s * 2**attempt between the four attempts


def test_transient_errors_are_absorbed_and_the_batch_is_whole():
    def flaky(i, p):
        return (503, "text/plain", "busy") if i < 2 else _ok(p)

    with _Server(flaky) as srv:
        engine = SGLangEngine(SGLangClient([srv.url], max_concurrency=1, max_retries=2, backoff_s=0.01))
        res = engine.generate([[1, 2], [3]], n=2, max_new_tokens=3, temperature=1.0, top_p=1.0, seed=0)
    assert [r.tolist() for r in res.response_ids] == [[7, 8, 9]] * 4 and res.prompt_index == [0, 0, 1, 1]


def test_a_request_that_keeps_failing_fails_the_whole_batch():
    def one_bad(i, p):  # prompt [3] always fails; the others are answered
        return (500, "text/plain", "oom") if p["input_ids"] == [3] else _ok(p)

    with _Server(one_bad) as srv:
        engine = SGLangEngine(SGLangClient([srv.url], max_retries=1, backoff_s=0.01))
        with pytest.raises(RolloutError, match="500"):
            engine.generate([[1], [3], [5]], n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0)


def test_a_rejected_request_is_not_retried():
    with _Server(lambda i, p: (400, "text/plain", "bad input_ids")) as srv:
        client = SGLangClient([srv.url], max_retries=3, backoff_s=0.01)
        with pytest.raises(
            RolloutError, match=r"127\.0\.0\.1:\d+/generate rejected the request: HTTP 400: bad"
        ):
            client.post("/generate", {"input_ids": [1]})
    assert len(srv.requests) == 1


@pytest.mark.parametrize(
    "body, needle",
    [
        ("{not json", "JSONDecodeError"),  # garbled payload (retried, then named)
        (json.dumps({"meta_info": {"finish_reason": {"type": "abort"}}}), "finish_reason"),
        (
            json.dumps({"meta_info": {"finish_reason": {"type": "length"}, "output_token_logprobs": []}}),
            "returned 0 tokens for max_new_tokens=2",
        ),  # fmt: skip
    ],
)
def test_garbled_or_inconsistent_generation_is_refused(body, needle):
    with _Server(lambda i, p: (200, "application/json", body)) as srv:
        engine = SGLangEngine(SGLangClient([srv.url], max_retries=1, backoff_s=0.01))
        with pytest.raises(RolloutError, match=needle):
            engine.generate([[1]], n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0)


def test_teacher_scores_of_other_tokens_are_refused():
    def wrong_tokens(i, p):  # scores token 99 at every position: a teacher serving something else
        n = len(p["input_ids"]) - p["logprob_start_len"]
        meta = {"input_token_logprobs": [[None, 0, None]] + [[-1.0, 99, None]] * (n - 1)}
        return 200, "application/json", json.dumps({"meta_info": meta})

    with _Server(wrong_tokens) as srv:
        scorer = SGLangScorer(SGLangClient([srv.url], max_retries=0))
        with pytest.raises(RolloutError, match="sample 0 position 0 scored token 99, not 5"):
            scorer.score([[1, 2]], [[5, 6]])


def test_wrong_model_server_is_refused_naming_both_models(tmp_path):
    cfg = {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4}  # fmt: skip
    for name, vocab in (("student", 128), ("other", 192)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab}))
    expected, other = str(tmp_path / "student"), str(tmp_path / "other")

    def info(path):
        return 200, "application/json", json.dumps({"model_path": served, "is_generation": True})

    with _Server(lambda i, p: _ok(p), get=info) as srv:
        client = SGLangClient([srv.url])
        served = other
        with pytest.raises(RolloutError, match=rf"teacher server {srv.url} serves .*other, not .*student "
                           r"\(vocab_size 192 vs 128\); restart it with --model-path"):  # fmt: skip
            check_served_model(client, expected, "teacher")
        served = expected
        check_served_model(client, expected, "teacher")  # the right model passes


def test_a_dead_teacher_error_says_teacher_which_server_and_what_was_tried():
    from megatron_opd.config.tree import TeacherConfig
    from megatron_opd.teacher.factory import build_teacher_scorer
    from megatron_opd.utils.spawn import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RolloutError) as e:  # the start-up probe is the teacher's first request
        build_teacher_scorer(TeacherConfig(backend="sglang", sglang_urls=[dead]), max_retries=2)
    msg = str(e.value)
    assert msg.startswith(
        f"SGLang teacher server request /generate failed after 3 attempts; last error from {dead}"
    )
    assert "Connection refused" in msg and f"tried {dead} (600 s timeout each, backoff from 0.5 s" in msg
    assert "3x ConnectionError" in msg
    # One line, not the retry history of every attempt with urllib3's nested reprs.
    assert "\n" not in msg and len(msg) < 400 and "ConnectionPool" not in msg

    with _Server(lambda i, p: (500, "text/plain", "boom")) as srv:
        client = SGLangClient([srv.url], max_retries=1, backoff_s=0.01, role="rollout")
        with pytest.raises(RolloutError, match=r"^SGLang rollout server request /generate failed after 2"):
            client.post("/generate", {"input_ids": [1]})
    with _Server(lambda i, p: (400, "text/plain", "bad")) as srv:
        client = SGLangClient([srv.url], role="teacher")
        with pytest.raises(
            RolloutError, match=r"^SGLang teacher server http://127\.0\.0\.1:\d+/generate rejected"
        ):
            client.post("/generate", {"input_ids": [1]})
