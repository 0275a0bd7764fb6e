"""analysis/schedules.py: curves from a run's scalars, their mean over seeds, and time to a target accuracy."""

import math

import pytest

from megatron_opd.analysis.schedules import (
    Curve,
    compare,
    curve_from_history,
    markdown_table,
    mean_curve,
    measured_line,
    merge_results,
    time_to_reach,
    write_marked_region,
)


def _history(step_seconds: float, accuracies: dict[int, float], steps: int) -> list[dict]:
    rows = []
    for k in range(1, steps + 1):
        row = {
            "step": k,
            "time/rollout_s": step_seconds / 2,
            "time/train_s": step_seconds / 2,
            "time/eval_s": 99.0,
        }
        if k in accuracies:
            row["eval/toy/avg@4"] = accuracies[k]
            row["eval/toy/pass@4"] = 1.0  # not an accuracy of the curve
        rows.append(row)
    return rows


def test_curve_counts_training_phases_only_and_reads_avg_at_k():
    c = curve_from_history("OPD", 1, {"eval/toy/avg@4": 0.1}, _history(2.0, {2: 0.5, 4: 0.8}, 4))
    assert c.steps == [0, 2, 4] and c.accuracy == [0.1, 0.5, 0.8]
    assert c.seconds == [0.0, 4.0, 8.0]  # evaluation seconds (time/eval_s) are not training time
    assert c.step_seconds == pytest.approx(2.0)


def test_mean_over_seeds_at_common_steps():
    a = Curve("x", 1, steps=[0, 5, 10], seconds=[0, 1, 2], accuracy=[0.0, 0.4, 0.8], step_seconds=0.2)
    b = Curve("x", 2, steps=[0, 5], seconds=[0, 3], accuracy=[0.2, 0.6], step_seconds=0.6)
    m = mean_curve([a, b])
    assert m.steps == [0, 5] and m.seconds == [0, 2] and m.accuracy == pytest.approx([0.1, 0.5])
    assert m.accuracy_std == pytest.approx([0.1, 0.1]) and m.step_seconds == pytest.approx(0.4)


def test_time_to_reach_and_the_comparison_table():
    opd = mean_curve([Curve("OPD", 1, [0, 10, 20], [0.0, 10.0, 20.0], [0.1, 0.7, 0.8], 1.0)])
    fast = mean_curve([Curve("TOPD", 1, [0, 10, 20], [0.0, 3.0, 6.0], [0.1, 0.78, 0.79], 0.3)])
    never = mean_curve([Curve("bad", 1, [0, 10, 20], [0.0, 2.0, 4.0], [0.1, 0.2, 0.3], 0.2)])
    assert time_to_reach(opd, 0.76) == (20.0, 20)  # 95% of 0.8: not at step 10 (0.7), at step 20
    assert time_to_reach(never, 0.76) is None
    rows = {r.name: r for r in compare({"OPD": opd, "TOPD": fast, "bad": never})}
    assert rows["OPD"].reach_ratio == pytest.approx(1.0) and rows["OPD"].time_ratio == pytest.approx(1.0)
    assert rows["TOPD"].reach_ratio == pytest.approx(3.0 / 20.0) and rows["TOPD"].reach_step == 10
    assert rows["TOPD"].time_ratio == pytest.approx(0.3)
    assert rows["bad"].reach_ratio is None and math.isclose(rows["bad"].final_accuracy, 0.3)
    table = markdown_table(list(rows.values()), {"OPD": "1.00"})
    assert "| bad | 0.300 +- 0.000 | 0.200 | 0.20 | - | never | - |" in table


def test_marked_region_is_replaced_not_appended(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nintro\n")
    write_marked_region(str(doc), "table v1", "cmp")
    doc.write_text(doc.read_text() + "\nafter\n")
    write_marked_region(str(doc), "table v2", "cmp")
    text = doc.read_text()
    assert text.count("<!-- cmp:begin -->") == 1 and "table v1" not in text and "table v2" in text
    assert text.startswith("# Title\n\nintro\n") and text.rstrip().endswith("after")


def test_merge_keeps_groups_not_rerun_replaces_rerun_ones_and_orders_variants():
    old = {
        "toy shipped": {"measured": {"date": "d1"}, "runs": ["shipped v1"]},
        "estimators (shipped, POPD)": {"measured": {"date": "d1"}, "runs": ["est"]},
        "toy late": {"measured": {"date": "d0"}, "runs": ["late v1"]},
    }
    new = {
        "toy first": {"measured": {"date": "d2"}, "runs": ["first"]},
        "toy late": {"measured": {"date": "d2"}, "runs": ["late v2"]},
    }
    merged = merge_results(old, new, variants=["shipped", "early", "late", "first"])
    assert list(merged) == ["toy shipped", "toy late", "toy first", "estimators (shipped, POPD)"]
    assert merged["toy late"] == new["toy late"] and merged["toy shipped"] == old["toy shipped"]
    assert old["toy late"]["runs"] == ["late v1"]  # the inputs are left alone


def test_measured_line_says_when_and_how():
    m = {"date": "2026-12-01", "command": "--variants early late --jobs 2", "runs": 36, "jobs": 2,
         "seconds": 401.6, "seeds": [1234, 7, 11], "steps": 100, "eval_every": 10, "eval_problems": 128}  # fmt: skip
    assert measured_line(m) == (
        "Measured 2026-12-01 by `tools/compare_schedules.py --variants early late --jobs 2` (36 runs, 2 at a "
        "time, 402 s for the whole command): seeds 1234, 7, 11; 100 steps; avg@4 on 128 held-out problems "
        "every 10 steps."
    )
