"""benchmarks/gpu_check.sh --dry-run: every part of the GPU acceptance run (benchmarks/gpu_acceptance.py) runs on
CPU at toy size and reports one PASS line per check, so the script cannot rot between GPU runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

# Every check the GPU run reports; the dry run's loss benchmark runs at one toy N (64).
CHECKS = ["loss-numerics", "loss-memory-N64", "loss-time-N64", "loss-fused-vs-chunked-N64", "loss-fp8-N64",
          "train-step", "checkpoint", "weight-gather"]  # fmt: skip


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "dry.md"
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it for the dry run itself
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    lines = dict(re.findall(r"^CHECK ([\w-]+): (PASS|FAIL) -- ", proc.stdout, flags=re.M))
    assert set(lines) == set(CHECKS), f"check lines: {lines}\n{log[-3000:]}"
    failed = [name for name, result in lines.items() if result != "PASS"]
    assert not failed, f"failed: {failed}\n{log[-3000:]}"
    assert proc.returncode == 0, log[-3000:]
    report = out.read_text()
    assert all(f"CHECK {name}: PASS" in report for name in CHECKS)
    # The report says whether TE and SGLang were there, and the CPU student ran Megatron's local spec.
    assert re.search(r"^transformer_engine: ", report, flags=re.M) and re.search(
        r"^sglang: ", report, flags=re.M
    )
    step_line = next(line for line in report.splitlines() if line.startswith("CHECK train-step"))
    assert "local spec, SDPA attention" in step_line, step_line
    # The student's step really trained: three finite losses are reported.
    losses = re.search(r"losses ([-\d.]+), ([-\d.]+), ([-\d.]+)", report)
    assert losses is not None, report
