"""SIGKILL a tiny training run at many points (after steps, inside steps, during checkpoint saves), resume it
with --checkpoint.load each time, and check nothing was lost: a thin wrapper of ``megatron_opd.utils.kill_resume``.

    python tools/kill_resume_harness.py --mode ci   --work-dir /tmp/kill_ci     # 2 kills, 8 steps (~2 min)
    python tools/kill_resume_harness.py --mode long --work-dir /tmp/kill_long   # 12 kills, 18 steps

Prints the report (each kill: where, what the checkpoint directory held, which step resume loaded) as JSON and
exits non-zero with the failed property when one does not hold.
"""

from __future__ import annotations

import argparse
import sys

from megatron_opd.utils.kill_resume import (
    CI_POINTS,
    CI_STEPS,
    LONG_POINTS,
    LONG_STEPS,
    HarnessError,
    make_tiny_setup,
    run_harness,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("ci", "long"), default="ci")
    parser.add_argument(
        "--work-dir", required=True, help="an empty directory (the tiny models are made there)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the random kill delays")
    args = parser.parse_args()
    points, steps = (CI_POINTS, CI_STEPS) if args.mode == "ci" else (LONG_POINTS, LONG_STEPS)
    train_args = make_tiny_setup(args.work_dir)
    epochs = -(-steps // 6)  # 6 steps an epoch on the tiny setup
    train_args += [
        "--train.train_steps",
        str(steps),
        "--train.epochs",
        str(epochs),
        "--checkpoint.save_interval",
        "2",
    ]
    try:
        report = run_harness(train_args, args.work_dir, points, seed=args.seed)
    except HarnessError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    print(report.to_json())


if __name__ == "__main__":
    main()
