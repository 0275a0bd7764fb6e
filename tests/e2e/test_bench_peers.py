"""benchmarks/bench_peers.py in quick mode: our side always; TRL's side only where `make bench-peers` built
.venv-trl (skipped otherwise). Uses the toy models of the CPU main job (cached in .cache/toy_models)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(
    r"^peers: time-to-peer-final ratio (\d+\.\d\d|inf); final avg@4 ours (\d\.\d{3}) vs peer (\d\.\d{3}) \(1 seeds\)$"
)


def _bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_peers.py", "--quick", "--json", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # the shared 2-core machine; a quiet one takes about a minute
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines(), json.loads(out.read_text())["results"]


def _check_ours(ours):
    curve = ours["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4]
    # Evaluation is off the clock: the first evaluation comes before any training step.
    assert curve[0]["train_s"] < 0.5
    assert curve[0]["train_s"] < curve[1]["train_s"] < curve[2]["train_s"]
    assert curve[0]["cpu_s"] < curve[1]["cpu_s"] < curve[2]["cpu_s"]
    assert all(0.0 <= p["avg"] <= 1.0 for p in curve)
    # The phases are inside the training wall-clock, evaluation is not: their sum can only be the smaller.
    assert 0 < sum(ours["phases"].values()) <= ours["train_s"]
    assert ours["steps"] == 4


@pytest.mark.parametrize("cores", [1, 2])
def test_bench_peers_ours_quick(tmp_path, cores):
    # --cores 2: two data-parallel ranks, each generating its own share (rollout.engine_ranks data_parallel)
    lines, results = _bench(tmp_path, "--no-peer", "--cores", str(cores))
    (seed,) = results
    _check_ours(results[seed]["ours"])
    assert "peer" not in results[seed]
    assert lines[-1] == "peers: peer side not run (--no-peer)"


@pytest.mark.skipif(
    not (ROOT / ".venv-trl" / ".installed").exists(), reason="no .venv-trl (built by `make bench-peers`)"
)
def test_bench_peers_trl_quick(tmp_path):
    lines, results = _bench(tmp_path)
    (seed,) = results
    ours, peer = results[seed]["ours"], results[seed]["peer"]
    _check_ours(ours)
    assert [p["step"] for p in peer["curve"]] == [0, 2, 4]
    assert peer["steps"] == 4 and peer["train_s"] > 0 and peer["cpu_s"] > 0
    # Step 0 is the same student evaluated with the same seed by the same evaluator: the same number exactly.
    assert peer["curve"][0]["avg"] == ours["curve"][0]["avg"]
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    assert float(m.group(2)) == pytest.approx(
        ours["curve"][-1]["avg"], abs=5.01e-4
    )  # printed with 3 decimals (half-even)
    assert float(m.group(3)) == pytest.approx(peer["curve"][-1]["avg"], abs=5.01e-4)
