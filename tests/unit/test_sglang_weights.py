"""The trainer side of the distributed weight sync (issue 12) against a fake SGLang worker on loopback that joins
the real gloo group in-process: the store binds the configured address only, each server's TP size comes from
its /server_info (a router or a multi-replica server is refused with what to do), the sync pauses and resumes
the servers, and a failed /update_weights_from_distributed is never retried: the group is torn down, the error
names the server, and the next sync forms a fresh group that works."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_opd.rollout.sglang_client import SGLangClient
from megatron_opd.rollout.sglang_topology import server_ranks, weight_sync_urls
from megatron_opd.rollout.sglang_weights import (
    DistributedWeightSync,
    default_sync_address,
    init_custom_process_group,
    listen_socket,
    resolve_sync_backend,
)
from megatron_opd.rollout.types import RolloutError


def _fake_worker(conn, info: dict, fail_updates: int) -> None:
    """A TP=1 SGLang worker in its own process (a process group name is registered once per process): joins
    weight-sync groups as rank ``rank_offset``, receives broadcasts, and fails the first ``fail_updates``
    /update_weights_from_distributed requests after receiving (a load error). GET /calls reports what it saw."""
    calls: list[str] = []
    groups: dict[str, dist.ProcessGroup] = {}
    received: dict[str, list] = {}
    left = [fail_updates]

    def handle(path: str, p: dict) -> dict:
        if path == "/init_weights_update_group":  # what SGLang's side does
            timeout = timedelta(seconds=30)
            store = dist.TCPStore(p["master_address"], p["master_port"], p["world_size"], False, timeout)
            groups[p["group_name"]] = init_custom_process_group(
                backend=p["backend"],
                store=store,
                world_size=p["world_size"],
                rank=p["rank_offset"],
                group_name=p["group_name"],
                timeout_s=30,
            )
        elif path == "/update_weights_from_distributed":
            for name, dtype, shape in zip(p["names"], p["dtypes"], p["shapes"]):
                t = torch.empty(shape, dtype=getattr(torch, dtype))
                dist.broadcast(t, src=0, group=groups[p["group_name"]])
                received[name] = t.tolist()
            if left[0] > 0:
                left[0] -= 1
                return {"success": False, "message": "load failed: boom"}
        elif path == "/destroy_weights_update_group":
            groups.pop(p["group_name"], None)
        return {"success": True, "message": "ok"}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, status: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/calls":
                self._json(200, {"calls": calls, "received": received})
            elif self.path == "/workers" and "workers" in info:  # an sglang-router's listing
                self._json(200, {"workers": [{"url": u, "is_healthy": True} for u in info["workers"]]})
            elif self.path in ("/server_info", "/get_server_info") and "tp_size" in info:
                self._json(200, info)
            elif self.path == "/get_server_info" and "workers" in info:  # what the router answers there
                self._json(200, {"router_manager": True, "workers_count": len(info["workers"])})
            else:
                self._json(404, {"detail": "Not Found"})

        def do_POST(self):
            p = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(self.path)
            self._json(200, handle(self.path, p))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    conn.send(httpd.server_address[1])
    httpd.serve_forever()


class _Worker:
    def __init__(self, info: dict, fail_updates: int):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_fake_worker, args=(child, info, fail_updates), daemon=True)
        self.proc.start()
        if not parent.poll(120):
            raise TimeoutError("fake worker did not start")
        self.url = f"http://127.0.0.1:{parent.recv()}"

    def seen(self) -> dict:
        return requests.get(self.url + "/calls", timeout=10).json()


@pytest.fixture
def worker_factory():
    made: list[_Worker] = []

    def make(info: dict | None = None, fail_updates: int = 0) -> _Worker:
        made.append(_Worker({"tp_size": 1, "dp_size": 1} if info is None else info, fail_updates))
        return made[-1]

    yield make
    for w in made:
        w.proc.kill()
        w.proc.join()


def test_the_store_listens_on_the_given_address_only():
    sock = listen_socket("127.0.0.2", 0)
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.2"
        with socket.socket() as c, pytest.raises(ConnectionRefusedError):
            c.connect(("127.0.0.1", port))  # the same port on another address of this host: nobody listens
    finally:
        sock.close()


def test_an_unusable_sync_address_is_refused_with_what_to_set():
    with pytest.raises(RolloutError, match="rollout.sync_address"):
        listen_socket("192.0.2.1", 0)  # TEST-NET-1: never an address of this host


def test_default_address_is_loopback_for_local_servers_and_routable_otherwise():
    assert default_sync_address(["http://127.0.0.3:30000", "http://localhost:1"]) == "127.0.0.1"
    remote = default_sync_address(["http://127.0.0.3:1", "http://192.0.2.7:30000"])
    assert remote != "127.0.0.1"  # the source address of this node's route towards the remote server
    assert not remote.startswith("127.")


def test_backend_auto_follows_cuda():
    assert resolve_sync_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    assert resolve_sync_backend("gloo") == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sync_backend"):
            resolve_sync_backend("nccl")


def test_a_router_stands_for_the_workers_it_lists(worker_factory):
    a, b = worker_factory(), worker_factory(info={"tp_size": 2})
    router = worker_factory(info={"workers": [a.url, b.url + "/"]})
    assert weight_sync_urls([router.url, a.url]) == [a.url, b.url]  # each worker once, in listed order
    assert server_ranks(SGLangClient(weight_sync_urls([router.url]))) == [1, 2]


def test_server_ranks_come_from_server_info(worker_factory):
    a, b = worker_factory(info={"tp_size": 2, "dp_size": 1}), worker_factory(info={"tp_size": 1})
    assert server_ranks(SGLangClient([a.url, b.url])) == [2, 1]


@pytest.mark.parametrize(
    "info, match",
    [
        ({}, r"no tp_size .*sglang-router.*list each worker"),
        ({"workers": []}, r"no tp_size .*sglang-router listing no workers"),
        ({"tp_size": 1, "dp_size": 2}, r"dp_size 2.*one server per replica"),
        ({"tp_size": 1, "pp_size": 2}, r"pp_size 2"),
    ],
)
def test_servers_the_group_cannot_serve_are_refused(worker_factory, info, match):
    w = worker_factory(info=info)
    with pytest.raises(RolloutError, match=match):
        server_ranks(SGLangClient([w.url]))


def test_a_failed_update_is_not_retried_tears_the_group_down_and_the_next_sync_reforms_it(worker_factory):
    good, bad = worker_factory(), worker_factory(fail_updates=1)
    client = SGLangClient([good.url, bad.url], timeout_s=30, max_retries=3, backoff_s=0.01)
    sync = DistributedWeightSync(client, master_address="127.0.0.1", backend="gloo", timeout_s=30)
    w1 = [("model.norm.weight", torch.arange(4.0)), ("lm_head.weight", torch.ones(2, 3))]
    with pytest.raises(
        RolloutError, match=bad.url.replace(".", r"\.") + r"/update_weights_from_distributed.*boom"
    ):
        sync.sync(w1)
    seen = bad.seen()
    assert seen["calls"].count("/update_weights_from_distributed") == 1  # one attempt: never retried
    assert "/destroy_weights_update_group" in seen["calls"] and sync.group is None  # torn down ...
    assert seen["calls"][-1] == "/continue_generation"  # ... and the servers generate again
    first = sync.group_name

    w2 = [("model.norm.weight", torch.full((4,), 7.0)), ("lm_head.weight", torch.zeros(2, 3))]
    sync.sync(w2)
    assert sync.group_name != first  # a fresh group: the servers may still hold the old name
    for w in (good, bad):
        seen = w.seen()
        calls = seen["calls"]
        second = calls[len(calls) - calls[::-1].index("/init_weights_update_group") :]  # after the rejoin
        assert second[:2] == ["/pause_generation", "/begin_weight_update"]
        assert second[2:-3] == ["/update_weights_from_distributed"]  # one bucket, one request
        assert second[-3:] == ["/end_weight_update", "/flush_cache", "/continue_generation"]
        for name, t in w2:
            assert torch.equal(torch.tensor(seen["received"][name]), t)
    assert sync.last_bytes == sum(t.numel() * t.element_size() for _, t in w2)
    sync.close()
