"""Request dispatch over several servers (issue 12): least outstanding requests first, retries elsewhere, a dead
server absorbed by the others, never a partial batch. Fake in-process HTTP servers on loopback stand in for
SGLang workers (the /generate answer has the real format); each records what it served."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_opd.rollout.sglang_client import SGLangClient
from megatron_opd.rollout.sglang_server import free_port
from megatron_opd.rollout.types import RolloutError


class _Worker:
    """Answers POSTs after ``delay_s``, or with HTTP ``fail_status`` when set; counts what it served."""

    def __init__(self, delay_s: float = 0.0, fail_status: int | None = None):
        self.served = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(delay_s)
                status = fail_status or 200
                if fail_status is None:
                    with outer.lock:
                        outer.served += 1
                body = json.dumps({"ok": True}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def workers():
    made: list[_Worker] = []

    def make(**kw) -> _Worker:
        made.append(_Worker(**kw))
        return made[-1]

    yield make
    for w in made:
        w.close()


def test_a_slow_server_draws_fewer_requests_than_a_fast_one(workers):
    """Round-robin would split 48 requests 24/24; least-outstanding sends most to the fast server, because the
    slow one keeps requests outstanding longer. (0.25 s vs ~0 s per request: the split is far from even on any
    machine; the bound 3x leaves room for scheduling noise.)"""
    slow, fast = workers(delay_s=0.25), workers(delay_s=0.0)
    client = SGLangClient([slow.url, fast.url], max_concurrency=4, timeout_s=10, max_retries=0)
    outs = client.map("/generate", [{"i": i} for i in range(48)])
    assert len(outs) == 48 and all(o == {"ok": True} for o in outs)
    assert slow.served + fast.served == 48
    assert fast.served >= 3 * slow.served, (slow.served, fast.served)
    assert client.outstanding == {slow.url: 0, fast.url: 0}  # every request released its slot


def test_equal_servers_share_the_load_evenly(workers):
    a, b = workers(delay_s=0.02), workers(delay_s=0.02)
    client = SGLangClient([a.url, b.url], max_concurrency=2, timeout_s=10, max_retries=0)
    client.map("/generate", [{"i": i} for i in range(40)])
    assert a.served + b.served == 40
    assert 12 <= a.served <= 28, (a.served, b.served)  # ties take turns: neither server is left idle


def test_sequential_requests_alternate_between_idle_servers(workers):
    """With nothing outstanding, ties go in turn (not always to the first URL)."""
    a, b = workers(), workers()
    client = SGLangClient([a.url, b.url], max_retries=0)
    for i in range(6):
        client.post("/generate", {"i": i})
    assert (a.served, b.served) == (3, 3)


def test_a_dead_server_is_absorbed_by_the_live_one(workers):
    """One URL refuses connections: each request that lands there is retried on a server not yet tried, so the
    whole batch completes on the live one within one retry."""
    live = workers()
    dead = f"http://127.0.0.1:{free_port()}"
    client = SGLangClient([dead, live.url], max_concurrency=4, timeout_s=5, max_retries=1, backoff_s=0.01)
    outs = client.map("/generate", [{"i": i} for i in range(20)])
    assert len(outs) == 20 and live.served == 20


def test_a_failing_server_with_no_retry_left_fails_the_batch_naming_it(workers):
    bad = workers(fail_status=503)
    client = SGLangClient([bad.url], max_concurrency=2, timeout_s=5, max_retries=1, backoff_s=0.01)
    with pytest.raises(RolloutError, match="failed after 2 attempts.*" + bad.url.replace(".", r"\.")):
        client.map("/generate", [{"i": i} for i in range(4)])


def test_retry_false_makes_one_attempt_only(workers):
    """Collective routes (weight sync) must never be retried blindly."""
    bad = workers(fail_status=503)
    client = SGLangClient([bad.url], timeout_s=5, max_retries=3, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match="failed after 1 attempt;"):
        client.post("/update_weights_from_distributed", {}, url=bad.url, retry=False)
    assert time.monotonic() - t0 < 2.0  # no backoff sleeps (0.01+0.02+0.04 s would follow retries)
