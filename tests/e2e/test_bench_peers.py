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


def test_report_gives_plateaus_beside_the_headline():
    """The report's numbers from made-up curves: the headline (first evaluation at the peer's final) and the
    plateau lines (last 3 evaluations' mean; a 3-evaluation moving average reaching the peer's plateau)."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_peers

    def run(avgs, step_s):
        curve = [
            {"step": 10 * i, "train_s": step_s * 10 * i, "cpu_s": step_s * 10 * i, "avg": a}
            for i, a in enumerate(avgs)
        ]
        phases = dict.fromkeys(bench_peers.PHASES, 0.0)
        return {
            "curve": curve,
            "train_s": curve[-1]["train_s"],
            "cpu_s": curve[-1]["cpu_s"],
            "phases": phases,
            "steps": 40,
        }

    # the peer ends on a lucky evaluation (0.90) above its plateau; ours ends just below that final
    ours = run([0.1, 0.80, 0.85, 0.86, 0.87], 0.1)
    peer = run([0.1, 0.80, 0.83, 0.84, 0.90], 0.25)
    args = argparse.Namespace(steps=40, eval_every=10, max_problems=128, cores=1, ours_args="")
    text = bench_peers.report({1: {"ours": ours, "peer": peer}}, args, [1.0])
    lines = text.strip().splitlines()
    assert lines[-1] == "peers: time-to-peer-final ratio inf; final avg@4 ours 0.870 vs peer 0.900 (1 seeds)"
    # plateaus: ours (0.85 + 0.86 + 0.87) / 3, the peer's (0.83 + 0.84 + 0.90) / 3; ours' moving average first
    # reaches 0.857 at step 30 (0.85, 0.86, 0.87; at step 20 it is 0.837), 3 s of the peer's 10 s
    assert (
        "- seed 1: plateau ours 0.860 vs peer 0.857; ours reaches the peer's plateau at 0.30 of the peer's training wall-clock"
        in lines
    )
    assert "- mean over seeds: time-to-peer-plateau ratio 0.30" in lines
