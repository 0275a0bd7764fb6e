"""Every socket a one-node run listens on is on loopback (issue 16 item 2): the single-process trainer's store
(``parallel/state.py``) and torchrun's rendezvous store under ``examples/pretrain_opd.sh`` (``parallel/launch.py``),
checked by listing the listening sockets of every process of a real run while it trains. torch's own TCPStore
and static rendezvous listen on ``*:PORT``."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_opd.utils.spawn import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from megatron_opd.rollout.tiny_model import make_tiny_pair

    return Path(make_tiny_pair(str(tmp_path_factory.mktemp("pair"))))


def _train_args(pair: Path, run_dir: Path) -> list[str]:
    return [
        "--model.hf_path", str(pair / "student"), "--teacher.hf_path", str(pair / "teacher"),
        "--train.data_path", str(pair / "data.jsonl"), "--train.apply_chat_template", "false",
        "--global-batch-size", "4", "--n-samples-per-prompt", "2", "--micro-batch-size", "2",
        "--rollout.max_response_length", "16", "--train.train_steps", "2", "--loss.impl", "reference",
        "--logging.progress_bar", "false", "--logging.log_dir", str(run_dir),
    ]  # fmt: skip


def _listening_sockets_until_exit(proc: subprocess.Popen, timeout_s: float) -> dict[tuple[str, int], str]:
    """Every TCP socket any process of ``proc``'s tree listened on while it ran: (ip, port) -> process name."""
    seen: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + timeout_s
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the run did not finish in time"
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                for c in p.net_connections("tcp"):
                    if c.status == psutil.CONN_LISTEN:
                        seen.setdefault((c.laddr.ip, c.laddr.port), " ".join(p.cmdline()[:4]))
            except psutil.Error:
                continue
        time.sleep(0.1)
    return seen


def _assert_loopback_only(seen: dict[tuple[str, int], str], proc: subprocess.Popen, log: Path) -> None:
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert seen, "no listening socket seen: the check saw nothing"
    outside = {addr: who for addr, who in seen.items() if not ipaddress.ip_address(addr[0]).is_loopback}
    assert not outside, f"listening beyond loopback: {outside}"
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("127.0.0.0/8") for ip, _ in seen)


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in (
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "WORLD_SIZE",
    ):
        env.pop(key, None)  # what the launcher chooses, not what this test process happens to have
    return env


def test_the_single_process_trainer_listens_on_loopback_only(pair, tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_opd.training.main", *_train_args(pair, tmp_path / "run")],
            env=_env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        _assert_loopback_only(_listening_sockets_until_exit(proc, 600), proc, log)


def test_a_one_node_torchrun_run_listens_on_loopback_only(pair, tmp_path):
    env = {
        **_env(),
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "MASTER_ADDR": "0.0.0.0",  # even a wildcard MASTER_ADDR binds loopback on one node
        "PYTHON": sys.executable,
    }
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "examples/pretrain_opd.sh", *_train_args(pair, tmp_path / "run")],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        seen = _listening_sockets_until_exit(proc, 600)
    _assert_loopback_only(seen, proc, log)
    assert int(env["MASTER_PORT"]) in {port for _, port in seen}  # the rendezvous store itself was seen
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # and the run trained


def test_on_several_nodes_the_store_binds_the_configured_address():
    from datetime import timedelta

    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from megatron_opd.parallel.launch import BACKEND, bound_tcp_store, create_handler

    def handler(endpoint: str, nodes: int):
        params = RendezvousParameters(BACKEND, endpoint, "run", nodes, nodes, rank="0")
        return create_handler(params)

    port = free_port()
    assert handler(f"192.0.2.7:{port}", 2).bind_addr == "192.0.2.7"  # MASTER_ADDR on a multi-node run
    one = handler(f"0.0.0.0:{port}", 1)
    assert (one.bind_addr, one.master_addr) == ("127.0.0.1", "127.0.0.1")  # loopback on one node
    with pytest.raises(ValueError, match="resolves to a loopback address on this node"):
        handler(f"localhost:{port}", 2)  # node 0 of two would bind an address the other node cannot reach
    with pytest.raises(ValueError, match="rank=NODE_RANK"):
        create_handler(RendezvousParameters(BACKEND, f"127.0.0.1:{port}", "run", 1, 1))

    store = bound_tcp_store("127.0.0.2", 0, 1, timedelta(seconds=30))
    store.set("k", "v")
    mine = [c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert (("127.0.0.2", store.port)) in [(a.ip, a.port) for a in mine]
    assert not any(a.port == store.port and a.ip != "127.0.0.2" for a in mine)
    del store
