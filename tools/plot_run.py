#!/usr/bin/env python
"""Turn runs' ``metrics.jsonl`` into PNG plots: accuracy against steps and training wall-clock, the horizon, and
the KL by response position (the paper's Fig. 13, from the trainer's ``opd_by_position/*`` scalars).

Usage: python tools/plot_run.py RUN_DIR [RUN_DIR ...] --out plots/
Several runs (e.g. OPD, POPD, TOPD) are drawn on the same axes, labelled by their folder names. Writes
``accuracy.png`` (when a run evaluated: ``eval/<set>/avg@k``, the teacher's ``eval_teacher/...`` as a dashed
line), ``horizon.png`` and ``kl_by_position.png`` (when the runs logged ``opd_by_position/kl_bNN``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

ACCURACY = re.compile(r"^eval/(?P<set>.+)/avg(@\d+)?$")
BY_POSITION = re.compile(r"^opd_by_position/(?P<metric>kl|topk_kl|log_ratio)_b(?P<bucket>\d+)$")


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per logged step, sorted by step; when a resumed run logged a step
    twice, its last row wins."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"no metrics.jsonl in '{run_dir}': pass a run directory written by the trainer")
    rows: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"warning: {path}:{i} is not JSON ({e}); skipped", file=sys.stderr)
                continue
            if isinstance(row.get("step"), int):
                rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def training_seconds(rows: list[dict]) -> list[float]:
    """Cumulative training wall-clock at each row: the sum of ``time/step_s`` (rollout, teacher, train and sync
    phases since the previous logged row), so evaluation time is left out, as in the paper's time axes."""
    total, out = 0.0, []
    for r in rows:
        v = r.get("time/step_s", 0.0)
        total += v if _finite(v) else 0.0
        out.append(total)
    return out


def _series(rows: list[dict], key: str, xs_all: list[float]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for x, r in zip(xs_all, rows):
        if _finite(r.get(key)):
            xs.append(x)
            ys.append(r[key])
    return xs, ys


def _plot_accuracy(plt, runs: dict[str, list[dict]], out_dir: str) -> str | None:
    keys = sorted({k for rows in runs.values() for r in rows for k in r if ACCURACY.match(k)})
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.2 * len(keys)), squeeze=False)
    for i, key in enumerate(keys):
        teacher_key = key.replace("eval/", "eval_teacher/", 1)
        for name, rows in runs.items():
            x_axes = ([float(r["step"]) for r in rows], training_seconds(rows))
            for j, xs_all in enumerate(x_axes):
                xs, ys = _series(rows, key, xs_all)
                if xs:
                    (line,) = axes[i][j].plot(xs, ys, marker="o", ms=3, label=name)
                    teacher = [r[teacher_key] for r in rows if _finite(r.get(teacher_key))]
                    if teacher:
                        axes[i][j].axhline(
                            teacher[0], ls="--", lw=1, color=line.get_color(), label=f"{name}: teacher"
                        )
        axes[i][0].set_xlabel("step")
        axes[i][1].set_xlabel("training wall-clock (s, evaluation excluded)")
        for j in range(2):
            axes[i][j].set_ylabel(key.removeprefix("eval/"))
            axes[i][j].grid(alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_horizon(plt, runs: dict[str, list[dict]], out_dir: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, rows in runs.items():
        xs, ys = _series(rows, "horizon/end", [float(r["step"]) for r in rows])
        if xs:
            ax.plot(xs, ys, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("horizon H_k (tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "horizon.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def position_curves(rows: list[dict], metric: str, parts: int = 3) -> list[tuple[str, list[float]]]:
    """The mean of ``opd_by_position/<metric>_bNN`` per bucket over each of ``parts`` consecutive slices of the
    rows that logged it (early, middle, late training): [(label, one value per bucket, NaN where none)]."""
    buckets: set[int] = set()
    logged = []
    for r in rows:
        found = {int(m["bucket"]): r[k] for k in r if (m := BY_POSITION.match(k)) and m["metric"] == metric}
        found = {b: v for b, v in found.items() if _finite(v)}
        if found:
            logged.append((r["step"], found))
            buckets.update(found)
    if not logged:
        return []
    n = max(buckets) + 1
    parts = min(parts, len(logged))
    curves = []
    for p in range(parts):
        chunk = logged[p * len(logged) // parts : (p + 1) * len(logged) // parts]
        ys = []
        for b in range(n):
            vals = [found[b] for _, found in chunk if b in found]
            ys.append(sum(vals) / len(vals) if vals else float("nan"))
        curves.append((f"steps {chunk[0][0]}-{chunk[-1][0]}", ys))
    return curves


def _plot_by_position(plt, runs: dict[str, list[dict]], out_dir: str) -> str | None:
    shown = {name: rows for name, rows in runs.items() if position_curves(rows, "kl")}
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], shown.items()):
        for metric, style in (("kl", "-"), ("topk_kl", "--")):
            for label, ys in position_curves(rows, metric):
                xs = [(b + 0.5) / len(ys) for b in range(len(ys))]
                what = "k1 KL (-r_t)" if metric == "kl" else "top-K KL"
                ax.plot(xs, ys, style, marker="o", ms=3, label=f"{what}, {label}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("response position / T_max")
        ax.set_ylabel("KL(student || teacher) per token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "kl_by_position.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[str], out_dir: str) -> list[str]:
    """Write the plots for ``run_dirs`` into ``out_dir``; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    runs = {os.path.basename(os.path.normpath(d)): read_metrics(d) for d in run_dirs}
    written = [
        _plot_accuracy(plt, runs, out_dir),
        _plot_horizon(plt, runs, out_dir),
        _plot_by_position(plt, runs, out_dir),
    ]
    return [p for p in written if p]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--out", default="plots", help="output directory for the PNG files")
    args = p.parse_args(argv)
    for path in plot_runs(args.runs, args.out):
        print(path)


if __name__ == "__main__":
    main()
