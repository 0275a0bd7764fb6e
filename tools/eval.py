#!/usr/bin/env python
"""Evaluate a Hugging Face or Megatron checkpoint: avg@k and pass@k on the configured sets.

  python tools/eval.py --hf-dir MODEL [--eval.datasets aime24,amc23 --eval.n_samples 16 ...]
  python tools/eval.py --megatron-ckpt RUN/iter_0000200 --hf-config-dir STUDENT_HF_DIR [...]

Any config key (``--eval.*``, ``--rollout.*``, ``--config FILE``) applies; generation is full-length
(rollout.max_response_length) unless --eval.max_new_tokens says otherwise, as in the paper.
"""

import argparse
import json
import sys

from megatron_opd.config import parse_config
from megatron_opd.eval.checkpoint_eval import evaluate_checkpoint
from megatron_opd.utils.errors import expected_errors_exit
from megatron_opd.utils.lifeline import bind_child_processes

bind_child_processes(__name__)  # its spawned helpers (checkpoint writers) die with it


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--hf-dir", help="HF model directory")
    g.add_argument(
        "--megatron-ckpt", help="Megatron torch_dist checkpoint (a trainer iter_* dir or a converted one)"
    )
    p.add_argument(
        "--hf-config-dir", help="HF directory whose config/tokenizer describe the Megatron checkpoint"
    )
    p.add_argument("--json", help="write the scores to this JSON file")
    args, rest = p.parse_known_args(argv)
    cfg = parse_config(rest, prog="tools/eval.py")
    results = evaluate_checkpoint(
        cfg.eval,
        cfg.rollout,
        hf_dir=args.hf_dir,
        megatron_ckpt=args.megatron_ckpt,
        hf_config_dir=args.hf_config_dir,
        seed=cfg.train.seed,
        apply_chat_template=cfg.train.apply_chat_template,
    )
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
