#!/usr/bin/env python
"""megatron-opd's CPU main job against Hugging Face TRL's DistillationTrainer, side by side in one run.

Why it exists: a user choosing a tool compares accuracy against wall-clock. This runs both on the same toy models
(``megatron_opd.toy.models.make_toy_models``), the same prompts in the same order (the main job's sampler, each
prompt ``n_samples_per_prompt`` times), the same batch (16 prompts x 4 rollouts), lr 1e-4 Adam, clip 1, the same CPU
cores (``--cores``, default 1: one torch thread each; with N, ours runs N single-threaded data-parallel ranks that
each generate their own share, the peer one process with N torch threads), and evaluates both students with the project's evaluator (avg@4 on 128 problems, temperature 1, the
same seeds) at the same steps. Evaluation is out of the training wall-clock: ours evaluates in the loop and the
time is taken out; TRL saves its student at those steps and is evaluated afterwards (``peer_trl.py``, run in
``.venv-trl`` as built by ``make bench-peers``). The two alternate which goes first from seed to seed, so drift of
a shared machine hits both alike; the load average is printed.

Ours is ``examples/configs/cpu_toy.yaml`` (POPD) plus ``--ours-args`` (any config override: the loss estimator,
the teacher backend, the horizon), so an estimator is measured against the peer by a flag.

Last line: ``peers: time-to-peer-final ratio R; final avg@4 ours A vs peer B (3 seeds)``, where R is our training
wall-clock to the first evaluation at or above the peer's final avg@4 over the peer's whole training wall-clock
(mean over seeds; ``inf`` when some seed never gets there), A and B the final avg@4 means over seeds. Before it,
the same question with less of one evaluation's noise: each run's plateau (its last 3 evaluations' mean) and our
time to the peer's plateau (3-evaluation moving average).

Usage: python benchmarks/bench_peers.py [--seeds 1234,7,11] [--steps 100] [--eval-every 10] [--quick]
         [--ours-args "--loss.pg_coef 0"] [--no-peer] [--out benchmarks/results/FILE.md] [--json FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("rollout", "teacher", "train", "sync")


def _avg(scalars: dict[str, float]) -> float:
    keys = [k for k in scalars if k.startswith("eval/") and "/avg@" in k]
    if len(keys) != 1:
        raise RuntimeError(f"expected one avg@k in the evaluation, got {keys}")
    return scalars[keys[0]]


def run_ours(argv: list[str]) -> dict[str, Any]:
    """The main job in this process; its training wall-clock with evaluation taken out, and its curve. With
    several ranks (``run_ours_ranks``) each calls it; the CPU seconds of the curve are then summed over ranks."""
    import torch

    from megatron_opd.training import run as R
    from megatron_opd.training.main import train

    clock = {"t0": 0.0, "eval_s": 0.0, "c0": 0.0, "eval_cpu_s": 0.0}
    curve: list[dict[str, float]] = []
    setup_run, evaluate = R.setup_run, R.evaluate

    def timed_setup(cfg):
        run = setup_run(cfg)
        clock["t0"], clock["c0"] = time.perf_counter(), time.process_time()
        return run

    def timed_evaluate(run, step, *, teacher=False):
        t, c = time.perf_counter(), time.process_time()
        out = evaluate(run, step, teacher=teacher)
        if run.info.world_size > 1:  # rank 0 evaluates alone: no other rank works on during that time
            torch.distributed.barrier()
        if not teacher:  # every rank keeps its clocks; rank 0 evaluates, the others get {}
            train_s = t - clock["t0"] - clock["eval_s"]
            cpu_s = c - clock["c0"] - clock["eval_cpu_s"]
            curve.append(
                {"step": step, "train_s": train_s, "cpu_s": cpu_s, "avg": _avg(out) if out else None}
            )
        clock["eval_s"] += time.perf_counter() - t
        clock["eval_cpu_s"] += time.process_time() - c
        return out

    R.setup_run, R.evaluate = timed_setup, timed_evaluate
    try:
        with contextlib.redirect_stdout(sys.stderr):
            history = train(argv)["steps"]
    finally:
        R.setup_run, R.evaluate = setup_run, evaluate
    phases = {ph: sum(h.get(f"time/{ph}_s", 0.0) for h in history) for ph in PHASES}
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        every: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, [pt["cpu_s"] for pt in curve])
        if torch.distributed.get_rank():
            return {}
        for i, pt in enumerate(curve):  # rank 0's curve: each point's CPU seconds summed over all ranks
            pt["cpu_s"] = sum(cpu[i] for cpu in every)
    last = curve[-1]
    return {
        "curve": curve,
        "train_s": last["train_s"],
        "cpu_s": last["cpu_s"],
        "phases": phases,
        "steps": len(history),
    }


def _ours_rank(rank: int, world: int, argv: list[str]) -> dict[str, Any]:
    return run_ours(argv)


def run_ours_ranks(argv: list[str], cores: int) -> dict[str, Any]:
    """Ours on ``cores`` single-threaded processes: data-parallel replicas, each generating its own share of the
    step (``rollout.engine_ranks data_parallel``), the step's 64 rollouts split evenly."""
    from megatron_opd.utils.spawn import run_on_ranks

    if cores == 1:
        return run_ours(argv)
    extra = ["--rollout.engine_ranks", "data_parallel", "--train.micro_batch_size", str(64 // cores)]
    return run_on_ranks(_ours_rank, cores, argv + extra, timeout_s=3600)[0]


def peer_python() -> str:
    return os.path.join(ROOT, ".venv-trl", "bin", "python")


def peer_env_ready() -> bool:
    """Whether ``make bench-peers`` (its trl-env step) finished building .venv-trl."""
    return os.path.exists(os.path.join(ROOT, ".venv-trl", ".installed"))


def run_peer(
    argv: list[str], seed: int, steps: int, save_steps: list[int], tmp: str, threads: int = 1
) -> dict[str, Any]:
    """TRL in .venv-trl on the main job's prompts in the main job's order; its students evaluated here."""
    import torch

    from megatron_opd.config import parse_config
    from megatron_opd.data.prompts import load_train_dataset
    from megatron_opd.data.sampler import PromptSampler
    from megatron_opd.data.tokenizer import load_tokenizer
    from megatron_opd.eval.evaluator import evaluate_sets
    from megatron_opd.rollout.embedded import EmbeddedEngine
    from megatron_opd.utils.seeding import evaluation_seed

    cfg = parse_config(argv, prog="bench_peers")
    tokenizer = load_tokenizer(cfg.model.hf_path)
    dataset = load_train_dataset(cfg.train, cfg.rollout, tokenizer)
    sampler = PromptSampler(len(dataset), cfg.train.global_batch_size, seed=seed, epochs=cfg.train.epochs)
    n = cfg.train.n_samples_per_prompt
    prompts = os.path.join(tmp, f"prompts_{seed}.jsonl")
    with open(prompts, "w", encoding="utf-8") as f:
        for _ in range(steps):
            for i in sampler.next_batch().indices:
                row = {"prompt": dataset[i].prompt_text, "prompt_ids": dataset[i].prompt_ids}
                f.write((json.dumps(row) + "\n") * n)
    out = os.path.join(tmp, f"peer_{seed}")
    cmd = [
        peer_python(), os.path.join(ROOT, "benchmarks", "peer_trl.py"),
        "--student", cfg.model.hf_path, "--teacher", cfg.teacher.hf_path, "--prompts", prompts,
        "--steps", str(steps), "--seed", str(seed), "--batch", str(cfg.train.global_batch_size * n),
        "--max-new-tokens", str(cfg.rollout.max_response_length), "--lr", str(cfg.optimizer.lr),
        "--clip", str(cfg.optimizer.clip_grad), "--save-steps", ",".join(map(str, save_steps)), "--out", out,
        "--threads", str(threads),
    ]  # fmt: skip
    # Our run in this process set torch.distributed's variables; the peer runs as a plain single process.
    drop = {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PYTHONPATH",
    }
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TORCHELASTIC")}
    env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(cmd, check=True, stdout=sys.stderr, env=env, cwd=ROOT)
    with open(os.path.join(out, "timing.json"), encoding="utf-8") as f:
        timing = json.load(f)
    engine = EmbeddedEngine.from_hf_dir(cfg.model.hf_path)
    curve = []
    for point in timing["curve"]:
        state = torch.load(os.path.join(out, f"step_{point['step']}.pt"), weights_only=True)
        engine.update_weights(state.items())
        res = evaluate_sets(
            cfg.eval,
            engine.generate,
            tokenizer,
            max_response_length=cfg.rollout.max_response_length,
            seed=evaluation_seed(seed, point["step"]),  # the main job's evaluation seed at that step
            apply_chat_template=cfg.train.apply_chat_template,
        )
        (result,) = res.values()
        curve.append({**point, "avg": result.avg})
    rows = timing["steps"]
    phases = {ph: sum(r[ph] for r in rows) for ph in ("rollout", "teacher")}
    phases["train"] = sum(r["step_s"] - r["rollout"] - r["teacher"] for r in rows)
    return {
        "curve": curve,
        "train_s": timing["train_s"],
        "cpu_s": timing["cpu_s"],
        "phases": phases,
        "steps": len(rows),
    }


def time_to(curve: list[dict[str, float]], target: float, key: str = "train_s", smooth: int = 1) -> float:
    """Training seconds (``key``: wall ``train_s`` or CPU ``cpu_s``) at the first evaluation whose avg, or with
    ``smooth`` > 1 the centred ``smooth``-evaluation moving average of it, is >= target (inf if none)."""
    h = smooth // 2
    for i, p in enumerate(curve):
        if statistics.fmean(q["avg"] for q in curve[max(0, i - h) : i + h + 1]) >= target:
            return p[key]
    return float("inf")


def plateau(curve: list[dict[str, float]], n: int = 3) -> float:
    """Mean avg@4 of the last ``n`` evaluations: the end of a run with less of one evaluation's noise."""
    return statistics.fmean(p["avg"] for p in curve[-n:])


def _cores_text(cores: int) -> str:
    if cores == 1:
        return "one torch thread each"
    return (
        f"{cores} CPU cores each (ours: {cores} single-threaded data-parallel ranks, each generating its share; "
        f"peer: one process, {cores} torch threads)"
    )


def report(results: dict[int, dict[str, Any]], args: argparse.Namespace, loads: list[float]) -> str:
    lines = [
        f"# megatron-opd vs TRL DistillationTrainer on the CPU main job ({datetime.date.today()})",
        "",
        f"{args.steps} steps, seeds {', '.join(map(str, results))}, evaluation every {args.eval_every} steps "
        f"(avg@4, temperature 1, {args.max_problems} problems), {_cores_text(args.cores)}; ours: cpu_toy.yaml "
        f"{args.ours_args or '(as shipped)'}. 1-minute load average during the run: "
        f"{min(loads):.1f} to {max(loads):.1f} ({os.cpu_count()} CPUs).",
        "",
        "Wall-clock is what the ratios below use; on a loaded shared machine the CPU seconds of each process "
        "(summed over threads and ranks) are the steadier measure of cost and are given beside it.",
        "",
        "| seed | system | s/step | CPU s/step | rollout s | teacher s | train s | sync s | train wall-clock s "
        "| final avg@4 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, r in results.items():
        for who in ("ours", "peer"):
            if who not in r:
                continue
            x = r[who]
            ph = " | ".join(f"{x['phases'].get(p, 0.0):.1f}" for p in PHASES)
            lines.append(
                f"| {seed} | {who} | {x['train_s'] / max(x['steps'], 1):.3f} | "
                f"{x['cpu_s'] / max(x['steps'], 1):.3f} | {ph} | {x['train_s']:.1f} | "
                f"{x['curve'][-1]['avg']:.3f} |"
            )
    for seed, r in results.items():
        lines += ["", f"Seed {seed}: avg@4 against training wall-clock and CPU seconds", ""]
        whos = [w for w in ("ours", "peer") if w in r]
        lines.append("| step | " + " | ".join(f"{w} s | {w} CPU s | {w} avg@4" for w in whos) + " |")
        lines.append("|---" * (1 + 3 * len(whos)) + "|")
        for i, point in enumerate(r["ours"]["curve"]):
            cells = [
                f"{r[w]['curve'][i]['train_s']:.1f} | {r[w]['curve'][i]['cpu_s']:.1f} | {r[w]['curve'][i]['avg']:.3f}"
                for w in whos
            ]
            lines.append(f"| {point['step']} | " + " | ".join(cells) + " |")
    if all("peer" in r for r in results.values()):
        ratios, per_seed, smoothed, plateaus = [], [], [], []
        for seed, r in results.items():
            target = r["peer"]["curve"][-1]["avg"]
            ratio = time_to(r["ours"]["curve"], target) / r["peer"]["train_s"]
            cpu_ratio = time_to(r["ours"]["curve"], target, "cpu_s") / r["peer"]["cpu_s"]
            ratios.append(ratio)
            o, q = r["ours"], r["peer"]
            speed = (o["train_s"] / o["steps"]) / (q["train_s"] / q["steps"])
            cpu_speed = (o["cpu_s"] / o["steps"]) / (q["cpu_s"] / q["steps"])
            per_seed.append(
                f"seed {seed}: peer final avg@4 {target:.3f}; time-to-peer-final ratio {ratio:.2f} "
                f"(CPU seconds {cpu_ratio:.2f}); s/step ratio ours/peer {speed:.2f} (CPU seconds {cpu_speed:.2f})"
            )
            peer_plateau = plateau(q["curve"])
            smoothed.append(time_to(o["curve"], peer_plateau, smooth=3) / q["train_s"])
            plateaus.append(
                f"seed {seed}: plateau ours {plateau(o['curve']):.3f} vs peer {peer_plateau:.3f}; ours reaches the "
                f"peer's plateau at {smoothed[-1]:.2f} of the peer's training wall-clock"
            )
        ours = statistics.fmean(r["ours"]["curve"][-1]["avg"] for r in results.values())
        peer = statistics.fmean(r["peer"]["curve"][-1]["avg"] for r in results.values())
        lines += ["", *(f"- {s}" for s in per_seed), ""]
        lines += [
            "Less noisy, beside the headline below (one evaluation is 512 samples of 128 problems: a standard "
            "error of at least 0.015 at avg@4 0.86): each run's plateau is the mean of its last 3 evaluations, and "
            "ours reaches the peer's plateau at the first evaluation whose 3-evaluation moving average does.",
            "",
            *(f"- {s}" for s in plateaus),
            f"- mean over seeds: time-to-peer-plateau ratio {statistics.fmean(smoothed):.2f}",
            "",
        ]
        lines.append(
            f"peers: time-to-peer-final ratio {statistics.fmean(ratios):.2f}; final avg@4 ours {ours:.3f} "
            f"vs peer {peer:.3f} ({len(results)} seeds)"
        )
    else:
        lines += ["", "peers: peer side not run (--no-peer)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1234,7,11", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per system and seed")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate both students every this many steps")
    p.add_argument("--max-problems", type=int, default=128, help="evaluation problems (avg@4 each)")
    p.add_argument("--quick", action="store_true", help="1 seed, 4 steps, evaluation at 0/2/4 on 32 problems")
    p.add_argument("--ours-args", default="", help="extra config overrides for our side (one shell string)")
    p.add_argument("--no-peer", action="store_true", help="run our side only (no .venv-trl needed)")
    p.add_argument(
        "--cores",
        type=int,
        default=1,
        help="CPU cores each system gets: ours as that many single-threaded data-parallel ranks, each generating "
        "its own share (rollout.engine_ranks data_parallel); the peer as one process with that many torch threads",
    )
    p.add_argument("--out", default=None, help="also write the report to this markdown file")
    p.add_argument("--json", default=None, help="also write the raw curves and timings to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.max_problems = args.seeds.split(",")[0], 4, 2, 32
    if args.cores < 1 or 64 % args.cores:
        p.error("--cores must divide the step's 64 rollouts (1, 2, 4, ...)")
    if args.steps % args.eval_every:
        p.error("--steps must be a multiple of --eval-every (both systems are evaluated at the same steps)")
    if not args.no_peer and not peer_env_ready():
        p.error(
            ".venv-trl is missing: build it with `make bench-peers` (or pass --no-peer for our side only)"
        )

    import torch

    torch.set_num_threads(1)
    from megatron_opd.analysis.schedules import main_job_argv
    from megatron_opd.toy.models import make_toy_models

    toy = make_toy_models()
    seeds = [int(s) for s in args.seeds.split(",")]
    save_steps = list(range(0, args.steps + 1, args.eval_every))
    results: dict[int, dict[str, Any]] = {}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        for k, seed in enumerate(seeds):
            argv_s = main_job_argv(
                toy, steps=args.steps, eval_every=args.eval_every, eval_problems=args.max_problems
            ) + [
                "--train.seed",
                str(seed),
            ]
            argv_s += shlex.split(args.ours_args)
            order = ["ours", "peer"] if k % 2 == 0 else ["peer", "ours"]
            results[seed] = {}
            for who in order:
                if who == "peer" and args.no_peer:
                    continue
                print(f"== seed {seed}: {who} ({args.steps} steps)", file=sys.stderr, flush=True)
                if who == "ours":
                    results[seed]["ours"] = run_ours_ranks(argv_s, args.cores)
                else:
                    results[seed]["peer"] = run_peer(argv_s, seed, args.steps, save_steps, tmp, args.cores)
                loads.append(os.getloadavg()[0])
            ours_steps = [pt["step"] for pt in results[seed]["ours"]["curve"]]
            if ours_steps != save_steps:
                raise RuntimeError(f"ours was evaluated at steps {ours_steps}, expected {save_steps}")
    text = report(results, args, loads)
    print(text, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"args": vars(args), "loads": loads, "results": {str(k): v for k, v in results.items()}}, f
            )
    return text


if __name__ == "__main__":
    main()
