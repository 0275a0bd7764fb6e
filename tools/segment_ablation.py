"""Segment ablation (the paper's Fig. 12): one OPD run per 10% rollout slice, distilling only that slice.

    torchrun --nproc-per-node 8 tools/segment_ablation.py --out runs/segments [--starts 0 0.2 0.4 0.6 0.8] \
        [--include-full] -- --config run.yaml --eval.eval_interval 0 --eval.at_end true ...

Everything after ``--`` is the training configuration (as for ``megatron_opd.training.main``); each run adds
``--horizon.schedule segment --horizon.segment_start a --horizon.segment_end a+width`` and its own
``--logging.log_dir``. Writes ``segments.json`` and ``segments.md`` (final eval scalars per slice) on rank 0.
Thin wrapper over ``megatron_opd.analysis.segments``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from megatron_opd.analysis.segments import DEFAULT_STARTS, eval_table, run_segment_ablation, segment_grid


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--starts", type=float, nargs="+", default=list(DEFAULT_STARTS))
    ap.add_argument("--width", type=float, default=0.1)
    ap.add_argument("--include-full", action="store_true", help="also run the full horizon (standard OPD)")
    ap.add_argument("train_argv", nargs=argparse.REMAINDER, help="-- then the training configuration")
    args = ap.parse_args(argv)
    train_argv = args.train_argv[1:] if args.train_argv[:1] == ["--"] else args.train_argv

    from megatron_opd.training.main import train

    results = run_segment_ablation(
        train,
        train_argv,
        segment_grid(args.starts, args.width),
        log_dir=str(args.out),
        include_full=args.include_full,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "segments.json").write_text(json.dumps(results))
        (args.out / "segments.md").write_text(eval_table(results) + "\n")
        print(eval_table(results))
    return results


if __name__ == "__main__":
    main()
