#!/usr/bin/env python
"""Turn a run's ``metrics.jsonl`` into PNG plots: accuracy vs step and vs wall-clock, KL by position (Fig. 13).

Usage: python tools/plot_run.py RUN_DIR [RUN_DIR ...] --out plots/
Several runs (e.g. OPD, POPD, TOPD) are drawn on the same axes, labelled by their folder names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def read_metrics(run_dir: str) -> list[dict]:
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"no metrics.jsonl in '{run_dir}': pass a run directory written by the trainer")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                print(f"warning: {path}:{i} is not JSON ({e}); skipped", file=sys.stderr)
    return rows


def _series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and x in r:
            xs.append(r[x])
            ys.append(v)
    return xs, ys


def plot_runs(run_dirs: list[str], out_dir: str) -> list[str]:
    """Write the plots for ``run_dirs`` into ``out_dir``; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    runs = {os.path.basename(os.path.normpath(d)): read_metrics(d) for d in run_dirs}
    acc_keys = sorted(
        {k for rows in runs.values() for r in rows for k in r if k.startswith("eval/") and k.endswith("avg")}
    )
    written = []
    if acc_keys:
        fig, axes = plt.subplots(len(acc_keys), 2, figsize=(10, 3.2 * len(acc_keys)), squeeze=False)
        for i, key in enumerate(acc_keys):
            for name, rows in runs.items():
                for j, x in enumerate(("step", "time/wall_clock_s")):
                    xs, ys = _series(rows, key, x)
                    if xs:
                        xs = [v / 3600 for v in xs] if j == 1 else xs
                        axes[i][j].plot(xs, ys, marker="o", ms=3, label=name)
            axes[i][0].set_xlabel("step")
            axes[i][1].set_xlabel("wall-clock (h)")
            for j in range(2):
                axes[i][j].set_ylabel(key)
                axes[i][j].grid(alpha=0.3)
            axes[i][0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "accuracy.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    for metric in ("topk_kl", "log_ratio"):
        prefix = f"opd_by_position/{metric}_"
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drew = False
        for name, rows in runs.items():
            keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
            if not keys:
                continue
            # average each bucket over the last quarter of the run's steps that measured it
            tail = rows[-max(1, len(rows) // 4) :]
            ys = []
            for k in keys:
                vals = [r[k] for r in tail if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
                ys.append(sum(vals) / len(vals) if vals else float("nan"))
            xs = [(i + 0.5) / len(keys) for i in range(len(keys))]
            ax.plot(xs, ys, marker="o", label=name)
            drew = True
        if drew:
            ax.set_xlabel("relative position in the response")
            ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{metric}_by_position.png")
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, rows in runs.items():
        xs, ys = _series(rows, "horizon/end")
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
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--out", default="plots", help="output directory for the PNG files")
    args = p.parse_args(argv)
    for path in plot_runs(args.runs, args.out):
        print(path)


if __name__ == "__main__":
    main()
