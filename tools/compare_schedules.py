#!/usr/bin/env python
"""Compare horizon schedules (and loss estimators) on the CPU toy task: accuracy against training wall-clock.

  python tools/compare_schedules.py                      # all variants, 3 seeds, writes docs/cpu_schedules*
  python tools/compare_schedules.py --variants shipped --ablation --jobs 2
  python tools/compare_schedules.py --quick --out-dir /tmp/cmp --doc /tmp/cmp/doc.md   # CI-sized

Every run is the CPU main job (examples/configs/cpu_toy.yaml) with one schedule's overrides, the same evaluation
protocol (avg@4 at temperature 1 on the held-out problems, every --eval-every steps, evaluation time excluded
from the training clock) and the same seeds. ``--jobs 2`` runs two single-threaded runs at once (one per core of
a 2-core machine; leave the machine otherwise idle, or the times are not comparable). The table, the plots and
the raw curves go to --out-dir. Results merge by group (a toy variant's schedules, an estimator ablation):
--out-dir/results.json keeps the groups not rerun, and the marked region of --doc is regenerated from all of them,
each group headed by when and how it was measured; a group's plot is redrawn only when it is rerun.

  python tools/compare_schedules.py --variants early late first --jobs 2   # adds/replaces those three groups
  python tools/compare_schedules.py --render-only                          # the page again from results.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(job: dict) -> dict:
    """One training run in this (worker) process; returns its curve as a dict."""
    import torch

    torch.set_num_threads(1)
    from megatron_opd.analysis.schedules import curve_from_history
    from megatron_opd.training.main import train

    t0 = time.perf_counter()
    out = train(job["argv"])
    curve = curve_from_history(job["name"], job["seed"], out["initial_eval"], out["steps"])
    print(
        f"  done: {job['group']} / {job['name']} seed {job['seed']} in {time.perf_counter() - t0:.0f} s "
        f"(final avg@4 {curve.accuracy[-1]:.3f})",
        file=sys.stderr,
        flush=True,
    )
    return {"group": job["group"], **curve.to_dict()}


def _slug(group: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", group.lower()).strip("_")


def _plot(groups: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for group, curves in groups.items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for name, c in curves.items():
            lo = [a - s for a, s in zip(c.accuracy, c.accuracy_std)]
            hi = [a + s for a, s in zip(c.accuracy, c.accuracy_std)]
            for ax, x in ((ax1, c.steps), (ax2, c.seconds)):
                ax.plot(x, c.accuracy, marker="o", markersize=3, label=name)
                ax.fill_between(x, lo, hi, alpha=0.15)
        ax1.set_xlabel("optimizer step")
        ax2.set_xlabel("training seconds (evaluation excluded)")
        for ax in (ax1, ax2):
            ax.set_ylabel("avg@4 (held-out)")
            ax.grid(alpha=0.3)
        ax1.legend(fontsize=8)
        fig.suptitle(f"{group}: accuracy against steps and wall-clock (mean +- sd over seeds)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{_slug(group)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    from megatron_opd.analysis import schedules as S

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(S.VARIANTS), choices=list(S.VARIANTS))
    p.add_argument("--schedules", nargs="+", default=list(S.SCHEDULES), choices=list(S.SCHEDULES))
    p.add_argument("--seeds", nargs="+", type=int, default=[1234, 7, 11])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-problems", type=int, default=128)
    p.add_argument(
        "--ablation", action="store_true", help="also the loss-estimator ablation (shipped toy, POPD)"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once (single-threaded each)")
    p.add_argument("--quick", action="store_true", help="CI size: a tiny toy recipe, 1 seed, a few steps")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "docs", "cpu_schedules"))
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "cpu_schedules.md"))
    p.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: regenerate the marked region of --doc from --out-dir/results.json",
    )
    args = p.parse_args(argv)
    if args.render_only:
        _write(args, {})
        return
    command = _command(args, p)

    from megatron_opd.toy.models import ToyRecipe, make_toy_models

    base_recipe = ToyRecipe()
    if args.quick:
        base_recipe = ToyRecipe(digits=2, num_train_prompts=64, num_eval_problems=16, batch_size=16,
                                teacher_steps=40, student_steps=10, warmup_steps=5)  # fmt: skip
        args.seeds, args.steps, args.eval_every, args.eval_problems = args.seeds[:1], 4, 2, 8
        args.variants = args.variants[:1]
        args.schedules = [s for s in args.schedules if s in ("OPD", "TOPD rho=0.25", "POPD")]

    jobs = []
    for variant in args.variants:
        recipe = dataclasses.replace(base_recipe, **S.VARIANTS[variant])
        base = S.main_job_argv(
            make_toy_models(recipe),
            steps=args.steps,
            eval_every=args.eval_every,
            eval_problems=args.eval_problems,
            max_response_length=recipe.max_response_tokens,
            steps_per_rollout=1,  # the paper's schedules, on-policy at every step (docs/cpu_schedules.md)
        )
        for name in args.schedules:
            for seed in args.seeds:
                argv = base + S.SCHEDULES[name] + ["--train.seed", str(seed)]
                jobs.append({"group": f"toy {variant}", "name": name, "seed": seed, "argv": argv})
        if args.ablation and variant == args.variants[0]:
            for name, extra in S.ESTIMATORS.items():
                for seed in args.seeds:
                    argv = base + S.SCHEDULES["POPD"] + extra + ["--train.seed", str(seed)]
                    jobs.append(
                        {"group": f"estimators ({variant}, POPD)", "name": name, "seed": seed, "argv": argv}
                    )
    print(f"{len(jobs)} runs, {args.jobs} at a time", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_run, jobs))
    else:
        results = [_run(job) for job in jobs]

    took = time.perf_counter() - t0
    new: dict[str, dict] = {}
    for r in results:
        group = new.setdefault(r["group"], {"measured": {}, "runs": []})
        group["runs"].append({k: v for k, v in r.items() if k != "group"})
    for group in new.values():
        group["measured"] = {
            "date": str(datetime.date.today()),
            "command": command,
            "runs": len(group["runs"]),
            "jobs": args.jobs,
            "seconds": round(took),
            "seeds": args.seeds,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "eval_problems": args.eval_problems,
        }
    os.makedirs(args.out_dir, exist_ok=True)
    plots = _plot(_means(new), args.out_dir)
    _write(args, new)
    print(f"plots: {', '.join(plots)}", file=sys.stderr)


def _means(groups: dict[str, dict]) -> dict[str, dict]:
    """group -> schedule -> its curve averaged over seeds."""
    from megatron_opd.analysis import schedules as S

    out: dict[str, dict] = {}
    for group, entry in groups.items():
        named: dict[str, list] = {}
        for run in entry["runs"]:
            named.setdefault(run["name"], []).append(S.Curve(**run))
        out[group] = {n: S.mean_curve(cs) for n, cs in named.items()}
    return out


def _write(args: argparse.Namespace, new: dict[str, dict]) -> None:
    """Merge ``new``'s groups into --out-dir/results.json (groups not rerun are kept) and regenerate the marked
    region of --doc from all of them."""
    from megatron_opd.analysis import schedules as S

    path = os.path.join(args.out_dir, "results.json")
    groups = S.merge_results(S.load_results(path), new, variants=list(S.VARIANTS))
    if not groups:
        raise SystemExit(
            f"nothing to write: no results in {path} and none measured (run without --render-only)"
        )
    os.makedirs(args.out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"groups": groups}, f, indent=1)

    sections = [
        "Time = training seconds (rollout + teacher + train + sync), evaluation excluded. Each group is measured "
        "by its own command (rerunning some groups keeps the others); its first line says when and how."
    ]
    for group, curves in _means(groups).items():
        ref = next((r for r in ("OPD", "policy gradient only") if r in curves), next(iter(curves)))
        rows = S.compare(curves, reference=ref)
        paper = S.PAPER_TIME_RATIO if group.startswith("toy") else None
        rel = os.path.relpath(os.path.join(args.out_dir, f"{_slug(group)}.png"), os.path.dirname(args.doc))
        table = (
            S.markdown_table(rows, paper)
            .replace("OPD's final", f"{ref}'s final")
            .replace("vs OPD", f"vs {ref}")
        )
        line = S.measured_line(groups[group]["measured"])
        sections.append(f"### {group}\n\n{line}\n\n{table}\n\n![{group}]({rel})")
    text = "\n\n".join(sections)
    S.write_marked_region(args.doc, text, "compare_schedules")
    print(text)


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The measurement's options as given (those away from their defaults; no paths), for the page."""
    parts = []
    for key in ("variants", "schedules", "seeds", "steps", "eval_every", "eval_problems", "ablation", "jobs",
                "quick"):  # fmt: skip
        value = getattr(args, key)
        if value == parser.get_default(key):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts.append(" ".join([flag, *(f'"{v}"' if " " in str(v) else str(v) for v in value)]))
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


if __name__ == "__main__":
    main()
