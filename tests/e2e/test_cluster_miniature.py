"""A cluster in miniature on one CPU box (issue 12): two trainer "nodes", two rollout servers, weight sync to both.

``torchrun --nnodes 2`` with one process per node, node 0 on 127.0.0.1 and node 1 on 127.0.0.2, the student at
pipeline-parallel size 2 (one layer per stage, so each node holds half the model); two real SGLang student
servers on 127.0.0.3 and 127.0.0.4; the teacher in-process. The weight-sync addresses are set explicitly, one
per stage (``--rollout.sync_address 127.0.0.1,127.0.0.2``): stage 0's sender (node 0) and stage 1's (node 1)
each form their own group with both servers and send only their own layers. The run trains three steps; then
each server scores a fixed sequence exactly as the run's final weights do (its checkpoint exported to HF and
scored in fp32 in-process), which differ from the initial weights' scores: both servers were really moved, by
both stages.

Last, an ``sglang-router`` (when installed) in front of both servers: rollouts through it, and a weight sync
given only its URL reaches both workers.

Cost: two server starts (~30 s each unloaded, in parallel here) and two trainer processes. Tolerance 1e-3
nats max abs, as the one-server test (tests/e2e/test_sglang_training.py): fp32 everywhere, different kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from megatron_opd.rollout.sglang_server import SGLangServer, default_sglang_python
from megatron_opd.utils.spawn import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        default_sglang_python() is None,
        reason="SGLang environment .venv-sglang not built (run `make sglang-env`)",
    ),
]

ATOL = 1e-3
VOCAB = 128
NODES = ("127.0.0.1", "127.0.0.2")
SERVER_HOSTS = ("127.0.0.3", "127.0.0.4")
STEPS = 3
FIXED_PROMPT, FIXED_RESPONSE = [5, 9, 13, 17], [20, 31, 42, 53, 64, 75, 86, VOCAB - 1]
REPO = Path(__file__).resolve().parents[2]


def _maxdiff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def _server_logprobs(url: str) -> list[float]:
    from megatron_opd.rollout.sglang_client import SGLangClient
    from megatron_opd.teacher.sglang_scorer import SGLangScorer

    client = SGLangClient([url], max_concurrency=4, timeout_s=60, max_retries=1, backoff_s=0.1)
    return SGLangScorer(client, vocab_size=VOCAB).score([FIXED_PROMPT], [FIXED_RESPONSE]).logprobs[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from megatron_opd.rollout.tiny_model import make_tiny_pair

    return Path(make_tiny_pair(str(tmp_path_factory.mktemp("cluster_pair")), num_prompts=16))


@pytest.fixture(scope="module")
def servers(pair, tmp_path_factory):
    """Two student servers on their own loopback addresses, started in parallel."""
    logs = tmp_path_factory.mktemp("cluster_logs")
    srvs = [
        SGLangServer(str(pair / "student"), host=h, max_total_tokens=8192, log_path=str(logs / f"{h}.log"))
        for h in SERVER_HOSTS
    ]
    errors: list[BaseException] = []

    def start(s: SGLangServer) -> None:
        try:
            s.start(timeout_s=600)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in srvs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield srvs
    finally:
        for s in srvs:
            s.stop()


def _argv(d: Path, urls: list[str], save: str) -> list[str]:
    return [
        "--model.hf_path", str(d / "student"),
        "--teacher.hf_path", str(d / "teacher"),
        "--teacher.backend", "embedded",
        "--train.data_path", str(d / "data.jsonl"),
        "--train.apply_chat_template", "false",
        "--global-batch-size", "4",
        "--n-samples-per-prompt", "2",
        "--micro-batch-size", "4",
        "--train.train_steps", str(STEPS),
        "--rollout.max_response_length", "16",
        "--horizon.schedule", "progressive", "--horizon.h0", "4", "--horizon.delta_h", "4",
        "--lr", "1e-2",
        "--teacher.topk", "4",
        "--loss.topk_kl_coef", "0.5",
        "--loss.impl", "reference",
        "--logging.progress_bar", "false",
        "--pipeline-model-parallel-size", "2",
        "--rollout.backend", "sglang",
        "--rollout.sglang_urls", ",".join(urls),
        "--rollout.weight_sync", "distributed",
        "--rollout.sync_address", ",".join(NODES),
        "--rollout.request_timeout_s", "120",
        "--checkpoint.save", save,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(pair, servers, tmp_path_factory):
    """The two-node run; returns its per-step metrics, the servers' scores before and after, and the final
    weights' scores."""
    from megatron_opd.model.hf_conversion import megatron_to_hf
    from megatron_opd.teacher.embedded import EmbeddedScorer

    urls = [s.url for s in servers]
    before = [_server_logprobs(u) for u in urls]
    root = tmp_path_factory.mktemp("cluster_run")
    save = str(root / "ckpt")
    port = free_port()
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    procs = []
    for node, addr in enumerate(NODES):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--master-addr", NODES[0], "--master-port", str(port), "--local-addr", addr,
            "-m", "megatron_opd.training.main", *_argv(pair, urls, save),
        ]  # fmt: skip
        log = open(root / f"node{node}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), log))
    try:
        for p, _ in procs:
            p.wait(timeout=1200)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    for node, (p, _) in enumerate(procs):
        assert p.returncode == 0, f"node {node} failed:\n" + (root / f"node{node}.log").read_text()[-6000:]
    steps = [json.loads(line) for line in (Path(save) / "metrics.jsonl").read_text().splitlines()]
    export = root / "export"
    megatron_to_hf(
        str(Path(save) / f"iter_{STEPS:07d}" / "dist"), str(export), hf_config_dir=str(pair / "student"),
        progress=False,
    )  # fmt: skip
    final = EmbeddedScorer.from_hf_dir(str(export)).score([FIXED_PROMPT], [FIXED_RESPONSE]).logprobs[0]
    return {"steps": steps, "before": before, "after": [_server_logprobs(u) for u in urls], "final": final}


def test_two_nodes_train_and_log_every_sync(run):
    steps = [s for s in run["steps"] if "train/loss" in s]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for s in steps:
        print(f"step {s['step']}: sync {s['sync/seconds']:.3f} s, {s['sync/gb_per_s']:.5f} GB/s")
        assert s["sync/seconds"] > 0  # each step's weights were sent ...
        assert s["sync/gb_per_s"] > 0  # ... and bytes were counted over both stages
        assert 1 <= s["rollout/response_length_max"] <= s["horizon/end"]


def test_both_servers_serve_the_final_weights_of_both_stages(run):
    """Each server scores the fixed sequence as the trained weights do; training moved those scores well past
    the tolerance, so a server missing either stage's layers (or any sync) would fail here."""
    moved = _maxdiff(run["before"][0], run["final"])
    assert moved > 20 * ATOL
    for url_scores in run["after"]:
        assert _maxdiff(url_scores, run["final"]) <= ATOL


def _router_binary() -> str | None:
    """``sglang-router`` ($OPD_SGLANG_ROUTER, else ``.venv-router/bin/sglang-router``), or None if not installed."""
    path = os.environ.get("OPD_SGLANG_ROUTER") or str(REPO / ".venv-router" / "bin" / "sglang-router")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def router(servers, run, tmp_path_factory):
    """An ``sglang-router`` on 127.0.0.5 in front of both servers (after the run: it reuses the servers)."""
    import time

    import requests

    binary = _router_binary()
    if binary is None:
        pytest.skip(
            "sglang-router not installed (pip install sglang-router into .venv-router, or set OPD_SGLANG_ROUTER)"
        )
    port = free_port()
    log = open(tmp_path_factory.mktemp("router") / "router.log", "w")  # noqa: SIM115 - closed below
    cmd = [
        binary,
        "launch",
        "--host",
        "127.0.0.5",
        "--port",
        str(port),
        "--worker-urls",
        *[s.url for s in servers],
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.5:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the router registers its workers asynchronously
            try:
                workers = requests.get(url + "/workers", timeout=2).json().get("workers", [])
                if sum(bool(w.get("is_healthy")) for w in workers) == len(servers):
                    break
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"sglang-router at {url} did not list both workers in 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_a_router_url_serves_rollouts_and_the_sync_reaches_its_workers(router, servers, run, pair):
    """Generation through the router works (its answers carry the trained weights' logprobs); a weight sync given
    only the router's URL reaches both workers behind it (the initial weights sent back, each worker scores
    them)."""
    from megatron_opd.config.tree import RolloutConfig
    from megatron_opd.rollout.decoder import load_hf_state_dict
    from megatron_opd.rollout.engine import build_rollout_engine

    assert _maxdiff(_server_logprobs(router), run["final"]) <= ATOL
    cfg = RolloutConfig(
        backend="sglang", sglang_urls=[router], weight_sync="distributed", request_timeout_s=120
    )
    engine = build_rollout_engine(cfg, hf_path=str(pair / "student"))
    assert sorted(engine.weight_sync.client.urls) == sorted(s.url for s in servers)
    res = engine.generate([[5, 9, 13], [7, 2]], n=2, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0)
    assert len(res.response_ids) == 4 and all(1 <= len(r) <= 6 for r in res.response_ids)
    try:
        engine.update_weights(load_hf_state_dict(str(pair / "student")).items())
    finally:
        engine.weight_sync.close()
    for s, before in zip(servers, run["before"]):
        assert _maxdiff(_server_logprobs(s.url), before) <= ATOL  # both workers back on the initial weights
