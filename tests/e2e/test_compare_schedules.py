"""tools/compare_schedules.py --quick: real (tiny) runs per schedule and estimator, reduced to tables and plots."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "compare_schedules.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


# A group measured earlier by another command (as in the old one-invocation results layout), which a run of
# other groups must keep: in results.json, and as a table under its own header on the page.
_EARLIER = {
    "args": {"seeds": [5], "steps": 20, "eval_every": 10, "eval_problems": 8, "jobs": 2},
    "runs": [
        {"group": "toy late", "name": "OPD", "seed": 5, "steps": [0, 10, 20], "seconds": [0.0, 1.0, 2.0],
         "accuracy": [0.25, 0.5, 0.875], "step_seconds": 0.1},
        {"group": "toy late", "name": "POPD", "seed": 5, "steps": [0, 10, 20], "seconds": [0.0, 0.5, 1.5],
         "accuracy": [0.25, 0.875, 0.875], "step_seconds": 0.075},
    ],
}  # fmt: skip


def test_quick_comparison_writes_curves_table_and_plots_and_keeps_other_groups(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Horizon schedules\n\nhand-written text that must survive\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps(_EARLIER))
    proc = _tool(tmp_path, "--quick", "--ablation", "--out-dir", str(tmp_path / "out"), "--doc", str(doc))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["groups"]
    runs = [{"group": g, **r} for g, entry in saved.items() for r in entry["runs"]]
    groups = {(r["group"], r["name"]) for r in runs}
    assert {("toy shipped", s) for s in ("OPD", "TOPD rho=0.25", "POPD")} <= groups
    assert {n for g, n in groups if g.startswith("estimators")} == {
        "policy gradient only",
        "top-K KL only",
        "both (sum)",
        "full-vocabulary KL",
    }
    # the earlier group kept as it was, after the toy variants in their order, with what it said of itself
    assert list(saved)[:2] == ["toy shipped", "toy late"] and saved["toy late"]["runs"] == [
        {k: v for k, v in r.items() if k != "group"} for r in _EARLIER["runs"]
    ]
    assert saved["toy late"]["measured"]["seeds"] == [5] and saved["toy late"]["measured"]["date"] is None
    assert saved["toy shipped"]["measured"]["command"] == "--ablation --quick"
    assert saved["toy shipped"]["measured"]["runs"] == 3 and saved["toy shipped"]["measured"]["seeds"] == [
        1234
    ]
    runs = [r for r in runs if r["group"] != "toy late"]
    for r in runs:  # evaluations at steps 0, 2, 4 and a training clock that only moves forward
        assert r["steps"] == [0, 2, 4] and r["seconds"][0] == 0.0 and r["seconds"][1] < r["seconds"][2]
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"])
    # Truncation makes steps cheaper: TOPD rho = 0.25 trains on a quarter of the horizon.
    step_s = {r["name"]: r["step_seconds"] for r in runs if r["group"] == "toy shipped"}
    assert step_s["TOPD rho=0.25"] < step_s["OPD"]
    text = doc.read_text()
    assert "hand-written text that must survive" in text and "| TOPD rho=0.25 |" in text
    assert (tmp_path / "out" / "toy_shipped.png").stat().st_size > 0
    assert not (tmp_path / "out" / "toy_late.png").exists()  # plots only for the groups this command ran
    region = text[text.index("<!-- compare_schedules:begin -->") :]
    late, shipped = region.index("### toy late"), region.index("### toy shipped")
    assert shipped < late and "| POPD | 0.875 +- 0.000 | 0.075 | 0.75 | 10 | 0.25 |" in region[late:]
    assert (
        "Measured (date not recorded) by `tools/compare_schedules.py` (2 runs, 2 at a time)" in region[late:]
    )
    assert "by `tools/compare_schedules.py --ablation --quick` (3 runs, 1 at a time" in region[shipped:late]

    # the page again from results.json alone, into a fresh doc: the same region
    again = tmp_path / "again.md"
    proc = _tool(tmp_path, "--render-only", "--out-dir", str(tmp_path / "out"), "--doc", str(again))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert again.read_text().strip() == region.strip()
