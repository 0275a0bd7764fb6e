#!/usr/bin/env python
"""Evaluate a Hugging Face or Megatron checkpoint: avg@k and pass@k on the configured sets.

  python tools/eval.py --run runs/cpu_toy                 # a run's newest checkpoint, with the run's own eval sets
  python tools/eval.py --hf-dir MODEL [--eval.datasets aime24,amc23 --eval.n_samples 16 ...]
  python tools/eval.py --megatron-ckpt RUN/iter_0000200 --hf-config-dir STUDENT_HF_DIR [...]

Any config key (``--eval.*``, ``--rollout.*``, ``--config FILE``) applies; generation is full-length
(rollout.max_response_length) unless --eval.max_new_tokens says otherwise, as in the paper. With ``--run`` the
run's saved ``config.yaml`` gives the defaults (eval sets, k, lengths, the student's HF directory for the
tokenizer) and the newest complete checkpoint under its ``checkpoint.save`` is evaluated.
"""

import argparse
import json
import os
import sys
import time

from megatron_opd.config import ConfigError, EvalConfig, parse_config
from megatron_opd.eval.checkpoint_eval import evaluate_checkpoint
from megatron_opd.utils.errors import expected_errors_exit
from megatron_opd.utils.lifeline import bind_child_processes

bind_child_processes(__name__)  # its spawned helpers (checkpoint writers) die with it


def _run_checkpoint(run_dir: str, rest: list[str]) -> tuple[list[str], str, str]:
    """(config arguments, newest checkpoint directory, student HF directory) of a training run's folder."""
    from megatron_opd.training.checkpoint import iteration_dir, latest_iteration

    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        raise ConfigError(
            f"--run {run_dir}: no config.yaml there (the trainer writes it into logging.log_dir)"
        )
    cfg = parse_config(["--config", config, *rest], prog="tools/eval.py")
    root = cfg.checkpoint.save
    iteration = latest_iteration(root) if root and os.path.isdir(root) else None
    if iteration is None:
        raise ConfigError(
            f"--run {run_dir}: the run saved no complete checkpoint (checkpoint.save = {root!r}); "
            "set checkpoint.save for the run, or evaluate an HF directory with --hf-dir"
        )
    return ["--config", config, *rest], iteration_dir(root, iteration), cfg.model.hf_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--run", help="a training run's log folder: its newest checkpoint with its own eval settings"
    )
    g.add_argument("--hf-dir", help="HF model directory")
    g.add_argument(
        "--megatron-ckpt", help="Megatron torch_dist checkpoint (a trainer iter_* dir or a converted one)"
    )
    p.add_argument(
        "--hf-config-dir", help="HF directory whose config/tokenizer describe the Megatron checkpoint"
    )
    p.add_argument("--json", help="write the scores to this JSON file")
    args, rest = p.parse_known_args(argv)
    if args.run:
        rest, args.megatron_ckpt, run_hf_dir = _run_checkpoint(args.run, rest)
        args.hf_config_dir = args.hf_config_dir or run_hf_dir
    cfg = parse_config(rest, prog="tools/eval.py")
    if cfg.eval.datasets == EvalConfig().datasets and not any(a.startswith("--eval.datasets") for a in rest):
        print(
            f"note: evaluating the default sets {', '.join(cfg.eval.datasets)} at avg@{cfg.eval.n_samples} with "
            f"responses up to {cfg.eval.max_new_tokens or cfg.rollout.max_response_length} tokens; pass "
            "--eval.datasets (or --run RUN_DIR for a run's own sets) to choose"
        )
    source = args.megatron_ckpt or args.hf_dir
    print(f"evaluating {source} on {', '.join(cfg.eval.datasets)} (avg@{cfg.eval.n_samples}) ...", flush=True)
    t0 = time.perf_counter()
    results = evaluate_checkpoint(
        cfg.eval,
        cfg.rollout,
        hf_dir=args.hf_dir,
        megatron_ckpt=args.megatron_ckpt,
        hf_config_dir=args.hf_config_dir,
        seed=cfg.train.seed,
        apply_chat_template=cfg.train.apply_chat_template,
        progress=lambda name, seconds: print(f"  {name}: done in {seconds:.1f} s", flush=True),
    )
    print(f"evaluated in {time.perf_counter() - t0:.1f} s")
    scores = {}
    for name, res in results.items():
        scores.update(res.metrics("eval"))
        pass_k = ", ".join(f"pass@{k} {v:.3f}" for k, v in res.pass_at.items())
        print(
            f"{name}: avg@{res.n_samples} {res.avg:.3f}, {pass_k}, mean length {res.mean_response_length:.0f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(scores, f, indent=2)


if __name__ == "__main__":
    with expected_errors_exit():  # bad input, missing or corrupt files: one line, exit code 2
        sys.exit(main())
