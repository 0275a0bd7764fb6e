"""The paper's LLM claim in small: horizon schedules compared on accuracy against training wall-clock.

Why it exists: the paper's headline is about time (Table 1, Fig. 1 and 5: TOPD rho = 0.1 reaches OPD's accuracy in
0.18x of its wall-clock, POPD in 0.34x). Time per step alone (``benchmarks/bench_horizon.py``) cannot show that:
a cheaper step that learns less is no gain. This module runs the CPU main job's distillation under each schedule
(and each loss estimator) over seeds, with one evaluation protocol, and reduces the runs to curves (accuracy
against steps and against cumulative training seconds, evaluation excluded) and to the paper's question: how
long does each schedule take to reach 95% of OPD's final accuracy, as a fraction of OPD's own time.

Training time is the sum of the rollout, teacher, train and sync phases of every step (what the loop measures
per step); evaluation is left out, as the paper's comparison is of training cost. ``tools/compare_schedules.py``
is the command line; ``docs/cpu_schedules.md`` holds the results.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PHASES = ("rollout", "teacher", "train", "sync")

# name -> config overrides on top of examples/configs/cpu_toy.yaml (T_max = 56 tokens there).
SCHEDULES: dict[str, list[str]] = {
    "OPD": ["--horizon.schedule", "full"],
    "TOPD rho=0.5": ["--horizon.schedule", "truncated", "--horizon.rho", "0.5"],
    "TOPD rho=0.25": ["--horizon.schedule", "truncated", "--horizon.rho", "0.25"],
    "TOPD rho=0.15": ["--horizon.schedule", "truncated", "--horizon.rho", "0.15"],
    "POPD": ["--horizon.schedule", "progressive"],  # the main job's: h0 = 8, dH = 4, dk = 1
    "adaptive": [
        "--horizon.schedule",
        "adaptive",
        "--horizon.adaptive_growth",
        "8",
        "--horizon.adaptive_window",
        "8",
    ],
}

# Table 1: total training time relative to OPD, R1-Distill pair (OpenMath pair in brackets).
PAPER_TIME_RATIO: dict[str, str] = {
    "OPD": "1.00 (1.00)",
    "TOPD rho=0.5": "0.61 (0.51)",
    "TOPD rho=0.25": "0.34 (0.26)",
    "TOPD rho=0.15": "-",
    "POPD": "0.34 (0.25)",
    "adaptive": "-",
}

# The loss-estimator ablation (same schedule, the main job's POPD): estimators of the per-token reverse KL.
_NONE = ["--loss.pg_coef", "0.0", "--loss.topk_kl_coef", "0.0", "--loss.full_kl_coef", "0.0"]
ESTIMATORS: dict[str, list[str]] = {
    "policy gradient only": [*_NONE, "--loss.pg_coef", "1.0"],
    "top-K KL only": [*_NONE, "--loss.topk_kl_coef", "1.0"],
    "both (sum)": [*_NONE, "--loss.pg_coef", "1.0", "--loss.topk_kl_coef", "1.0"],
    "full-vocabulary KL": [*_NONE, "--loss.full_kl_coef", "1.0"],
}

# Toy-task variants (megatron_opd.toy.models.ToyRecipe overrides): where the student's mistakes sit.
VARIANTS: dict[str, dict[str, Any]] = {
    # as shipped: the student mostly answers with a bare sum (format choice at token 0); learning to guess sums
    # after "=" also blurs its traces' answers (forced to start a trace, sampled: 0.72 against the teacher's 0.96).
    "shipped": {},
    # errs at the start and beyond: almost always the bare-sum format, and its rare traces are rarely sound
    # (forced to start a trace, sampled: 0.25).
    "early": {"student_shortcut_rate": 0.95},
    # errs late: always the right format, but sloppy carries inside the trace (positions 13, 22, 31, ...).
    "late": {"student_shortcut_rate": 0.0, "student_carry_drop_rate": 0.5},
    # errs only at its first token, the case the paper's TOPD targets: shipped's format mix, but the bare-answer
    # targets train only their first token ("="), so the student prefers the bare sum (0.81 of samples) while
    # its traces stay the teacher's (forced to start a trace, sampled: 0.91).
    "first": {"student_shortcut_loss_tokens": 1},
}


_MAIN_JOB_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "examples",
    "configs",
    "cpu_toy.yaml",
)


def main_job_argv(
    toy: Any,
    *,
    steps: int,
    eval_every: int = 0,
    eval_problems: int = 128,
    max_response_length: int | None = None,
    steps_per_rollout: int | None = None,
) -> list[str]:
    """The CPU main job (``examples/configs/cpu_toy.yaml``) on ``toy``'s models (``toy.models.ToyModels``), as a
    measurement run: ``steps`` steps; with ``eval_every`` > 0 the student is evaluated at the start, every
    ``eval_every`` steps and at the end on ``eval_problems`` problems, with 0 never; no teacher evaluation, log
    folder, checkpoint or progress bar, and a console line only at evaluations. ``steps_per_rollout``: None keeps
    the main job's (2); the schedule measurements pass 1, every step sampling from its own student as in the
    paper. Append overrides to it."""
    evaluate = "true" if eval_every else "false"
    argv = [
        "--config", _MAIN_JOB_CONFIG,
        "--model.hf_path", toy.student, "--teacher.hf_path", toy.teacher, "--train.data_path", toy.train_data,
        "--eval.datasets", toy.eval_spec, "--eval.max_problems", str(eval_problems),
        "--train.train_steps", str(steps), "--eval.eval_interval", str(eval_every),
        "--eval.at_start", evaluate, "--eval.at_end", evaluate, "--eval.eval_teacher", "false",
        "--logging.log_dir", "none", "--logging.progress_bar", "false", "--logging.log_interval", "100000",
        "--checkpoint.save", "none",
    ]  # fmt: skip
    if max_response_length is not None:
        argv += ["--rollout.max_response_length", str(max_response_length)]
    if steps_per_rollout is not None:
        argv += ["--train.steps_per_rollout", str(steps_per_rollout)]
    return argv


@dataclass
class Curve:
    """One run: accuracy at each evaluation, with the step and the cumulative training seconds there."""

    name: str
    seed: int
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    step_seconds: float = 0.0
    """Mean training seconds per step over the run."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def curve_from_history(name: str, seed: int, initial_eval: dict[str, float], steps: Sequence[dict]) -> Curve:
    """A ``Curve`` from ``training.main.train``'s return value (its initial eval and per-step scalars)."""
    curve = Curve(name, seed)
    acc0 = _accuracy(initial_eval)
    if acc0 is not None:
        curve.steps.append(0)
        curve.seconds.append(0.0)
        curve.accuracy.append(acc0)
    total = 0.0
    for row in steps:
        total += sum(float(row.get(f"time/{ph}_s", 0.0)) for ph in PHASES)
        acc = _accuracy(row)
        if acc is not None:
            curve.steps.append(int(row["step"]))
            curve.seconds.append(total)
            curve.accuracy.append(acc)
    curve.step_seconds = total / max(len(steps), 1)
    return curve


def _accuracy(scalars: dict[str, float]) -> float | None:
    """The student's avg@k on the (single) evaluation set: ``eval/<set>/avg@<k>``."""
    keys = sorted(k for k in scalars if k.startswith("eval/") and "/avg@" in k)
    return float(scalars[keys[0]]) if keys else None


@dataclass
class MeanCurve:
    """Curves of one schedule averaged over seeds at their common evaluation steps."""

    name: str
    steps: list[int]
    seconds: list[float]
    accuracy: list[float]
    accuracy_std: list[float]
    step_seconds: float
    seeds: int


def mean_curve(curves: Sequence[Curve]) -> MeanCurve:
    """Average runs of one schedule (different seeds) at the evaluation steps they all have."""
    if not curves:
        raise ValueError("no runs to average")
    common = sorted(set.intersection(*(set(c.steps) for c in curves)))
    secs, acc, std = [], [], []
    for s in common:
        at = [c.steps.index(s) for c in curves]
        secs.append(statistics.fmean(c.seconds[i] for c, i in zip(curves, at)))
        vals = [c.accuracy[i] for c, i in zip(curves, at)]
        acc.append(statistics.fmean(vals))
        std.append(statistics.pstdev(vals) if len(vals) > 1 else 0.0)
    return MeanCurve(
        curves[0].name, common, secs, acc, std, statistics.fmean(c.step_seconds for c in curves), len(curves)
    )


def time_to_reach(curve: MeanCurve, target: float) -> tuple[float, int] | None:
    """(training seconds, step) at the first evaluation whose mean accuracy is >= ``target``; None if never."""
    for secs, step, acc in zip(curve.seconds, curve.steps, curve.accuracy):
        if acc >= target:
            return secs, step
    return None


@dataclass
class Row:
    """One schedule's line of the comparison table."""

    name: str
    final_accuracy: float
    final_std: float
    step_seconds: float
    time_ratio: float
    """Total training seconds relative to the reference (the paper's Table 1 'Time' as a ratio)."""
    reach_step: int | None
    reach_ratio: float | None
    """Seconds to reach ``fraction`` of the reference's final accuracy, relative to the reference's own."""


def compare(curves: dict[str, MeanCurve], reference: str = "OPD", fraction: float = 0.95) -> list[Row]:
    """The table: final accuracy, cost, and time to ``fraction`` of the reference's final accuracy."""
    ref = curves[reference]
    target = fraction * ref.accuracy[-1]
    ref_reach = time_to_reach(ref, target)
    if (
        ref_reach is None
    ):  # cannot happen: the reference reaches its own final accuracy at the latest at its end
        raise AssertionError("the reference never reaches its own final accuracy")
    rows = []
    for name, c in curves.items():
        reach = time_to_reach(c, target)
        rows.append(
            Row(
                name=name,
                final_accuracy=c.accuracy[-1],
                final_std=c.accuracy_std[-1],
                step_seconds=c.step_seconds,
                time_ratio=c.seconds[-1] / ref.seconds[-1] if ref.seconds[-1] > 0 else math.nan,
                reach_step=None if reach is None else reach[1],
                reach_ratio=None if reach is None else reach[0] / max(ref_reach[0], 1e-12),
            )
        )
    return rows


def markdown_table(rows: Sequence[Row], paper: dict[str, str] | None = None, fraction: float = 0.95) -> str:
    """The comparison as a markdown table (paper ratios beside ours when given)."""
    pct = f"{fraction:.0%}"
    head = (
        f"| schedule | final avg@4 (mean +- sd) | s/step | total time vs OPD | step reaching {pct} of OPD's final | "
        f"time to {pct} of OPD's final vs OPD |"
    )
    sep = "|---|---|---|---|---|---|"
    if paper is not None:
        head += " paper: total time vs OPD |"
        sep += "---|"
    lines = [head, sep]
    for r in rows:
        reach = "never" if r.reach_ratio is None else f"{r.reach_ratio:.2f}"
        step = "-" if r.reach_step is None else str(r.reach_step)
        line = (
            f"| {r.name} | {r.final_accuracy:.3f} +- {r.final_std:.3f} | {r.step_seconds:.3f} | "
            f"{r.time_ratio:.2f} | {step} | {reach} |"
        )
        if paper is not None:
            line += f" {paper.get(r.name, '-')} |"
        lines.append(line)
    return "\n".join(lines)


# results.json: {"groups": {group: {"measured": {...}, "runs": [Curve.to_dict(), ...]}}}, one entry per group
# (a toy variant's schedules, or an estimator ablation), each with how it was measured.


def load_results(path: str) -> dict[str, dict[str, Any]]:
    """The groups of a ``tools/compare_schedules.py`` results file (empty when there is none). The older
    one-invocation layout ``{"args": ..., "runs": [...]}`` is read as groups sharing that invocation's settings,
    with the date, command and duration unknown (``None``)."""
    if not os.path.exists(path):
        return {}
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "groups" in data:
        return data["groups"]
    if "runs" not in data:
        raise ValueError(f"{path}: not a compare_schedules results file (neither 'groups' nor 'runs')")
    args = data.get("args", {})
    groups: dict[str, dict[str, Any]] = {}
    for run in data["runs"]:
        group = groups.setdefault(run["group"], {"measured": {}, "runs": []})
        group["runs"].append({k: v for k, v in run.items() if k != "group"})
    for group in groups.values():
        group["measured"] = {
            "date": None,
            "command": None,
            "runs": len(group["runs"]),
            "jobs": args.get("jobs"),
            "seconds": None,
            "seeds": args.get("seeds"),
            "steps": args.get("steps"),
            "eval_every": args.get("eval_every"),
            "eval_problems": args.get("eval_problems"),
        }
    return groups


def merge_results(
    old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], variants: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """``old``'s groups with ``new``'s added or put in their place (a rerun group replaces the whole group).
    Ordered for the page: the toy variants (``toy <name>``) in the order of ``variants``, then the other groups
    (estimator ablations, unknown variants) in their order of first appearance."""
    merged = {**old, **new}
    rank = {f"toy {v}": i for i, v in enumerate(variants)}
    order = list(dict.fromkeys([*old, *new]))
    return {g: merged[g] for g in sorted(order, key=lambda g: (rank.get(g, len(rank)), order.index(g)))}


def measured_line(measured: dict[str, Any]) -> str:
    """How a group was measured, one line for the page: date, command, runs, parallel jobs, protocol."""
    m = measured
    date = m.get("date") or "(date not recorded)"
    command = "`tools/compare_schedules.py" + (f" {m['command']}" if m.get("command") else "") + "`"
    took = f", {m['seconds']:.0f} s for the whole command" if m.get("seconds") is not None else ""
    seeds = ", ".join(map(str, m.get("seeds") or [])) or "?"
    return (
        f"Measured {date} by {command} ({m.get('runs')} runs, {m.get('jobs')} at a time{took}): seeds {seeds}; "
        f"{m.get('steps')} steps; avg@4 on {m.get('eval_problems')} held-out problems every {m.get('eval_every')} "
        "steps."
    )


def write_marked_region(path: str, text: str, tag: str) -> None:
    """Put ``text`` between ``<!-- tag:begin -->`` and ``<!-- tag:end -->`` in the markdown file ``path``
    (appended with the markers the first time), leaving the hand-written rest of the file as it is."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + begin + "\n" + text + "\n" + end + old[old.index(end) + len(end) :]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + begin + "\n" + text + "\n" + end + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
