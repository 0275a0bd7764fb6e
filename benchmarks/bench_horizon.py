#!/usr/bin/env python
"""Seconds per step and per phase of OPD vs TOPD (rho = 0.25, 0.1) vs POPD on the CPU main job, as ratios.

Why it exists: the paper's claim is about cost (Table 1: TOPD rho = 0.1 took 5.3 h where OPD took 29.7 h). This
runs the CPU job's models and config for the same number of steps under each schedule, in one process and in
the order A B C D D C B A so that drift of a shared machine hits every schedule alike, and prints the mean
seconds per step and per phase with the ratio to OPD, beside the paper's ratios.

Usage: python benchmarks/bench_horizon.py [--steps 30] [--out benchmarks/results/FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys

SCHEDULES = {
    "OPD": ["--horizon.schedule", "full"],
    "TOPD rho=0.25": ["--horizon.schedule", "truncated", "--horizon.rho", "0.25"],
    "TOPD rho=0.1": ["--horizon.schedule", "truncated", "--horizon.rho", "0.1"],
    "POPD": ["--horizon.schedule", "progressive"],  # h0 = 8, dH = 4, dk = 1 from cpu_toy.yaml
}
# Table 1, total training time relative to OPD (R1-Distill-1.5B pair; OpenMath pair in brackets).
PAPER = {
    "OPD": "1.00 (1.00)",
    "TOPD rho=0.25": "0.34 (0.26)",
    "TOPD rho=0.1": "0.18 (0.13)",
    "POPD": "0.34 (0.25)",
}
PHASES = ("rollout", "teacher", "train", "sync")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per schedule and repetition")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from megatron_opd.analysis.schedules import main_job_argv
    from megatron_opd.toy.models import make_toy_models
    from megatron_opd.training.main import train

    toy = make_toy_models()
    # no evaluation: time per step only; every step on-policy, as the paper's runs whose ratios it sits beside
    base = main_job_argv(toy, steps=args.steps, steps_per_rollout=1)
    order = list(SCHEDULES) + list(reversed(SCHEDULES))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in SCHEDULES}
    for name in order:
        print(f"== {name} ({args.steps} steps)", file=sys.stderr, flush=True)
        samples[name].extend(train(base + SCHEDULES[name])["steps"])

    def mean(name: str, key: str) -> float:
        return statistics.fmean(s.get(key, 0.0) for s in samples[name])

    step_time = {n: sum(mean(n, f"time/{ph}_s") for ph in PHASES) for n in SCHEDULES}
    ref = step_time["OPD"]
    lines = [
        f"# Horizon cost on the CPU main job ({datetime.date.today()}, {_cpu_name()}, 1 thread)",
        "",
        f"{args.steps} steps per schedule, run twice in the order A B C D D C B A; means over both runs. "
        "Response tokens: mean generated per rollout. Paper: Table 1 training time relative to OPD.",
        "",
        "| schedule | s/step | ratio to OPD | paper ratio | rollout s | teacher s | train s | sync s | response tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in SCHEDULES:
        phases = " | ".join(f"{mean(n, f'time/{ph}_s'):.3f}" for ph in PHASES)
        lines.append(
            f"| {n} | {step_time[n]:.3f} | {step_time[n] / ref:.2f} | {PAPER[n]} | {phases} | "
            f"{mean(n, 'rollout/response_length_mean'):.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
