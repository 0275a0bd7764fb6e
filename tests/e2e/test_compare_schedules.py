"""tools/compare_schedules.py --quick: real (tiny) runs per schedule and estimator, reduced to tables and plots."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_comparison_writes_curves_table_and_plots(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Horizon schedules\n\nhand-written text that must survive\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "compare_schedules.py"), "--quick", "--ablation",
         "--out-dir", str(tmp_path / "out"), "--doc", str(doc)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    groups = {(r["group"], r["name"]) for r in runs}
    assert {("toy shipped", s) for s in ("OPD", "TOPD rho=0.25", "POPD")} <= groups
    assert {n for g, n in groups if g.startswith("estimators")} == {
        "policy gradient only",
        "top-K KL only",
        "both (sum)",
        "full-vocabulary KL",
    }
    for r in runs:  # evaluations at steps 0, 2, 4 and a training clock that only moves forward
        assert r["steps"] == [0, 2, 4] and r["seconds"][0] == 0.0 and r["seconds"][1] < r["seconds"][2]
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"])
    # Truncation makes steps cheaper: TOPD rho = 0.25 trains on a quarter of the horizon.
    step_s = {r["name"]: r["step_seconds"] for r in runs if r["group"] == "toy shipped"}
    assert step_s["TOPD rho=0.25"] < step_s["OPD"]
    text = doc.read_text()
    assert "hand-written text that must survive" in text and "| TOPD rho=0.25 |" in text
    assert (tmp_path / "out" / "toy_shipped.png").stat().st_size > 0
