"""Reproduce the paper's control-task results (Fig. 3, Fig. 14, Table 2, Fig. 8) and write them under docs/.

Thin wrapper over ``megatron_opd.control``. Full mode (the committed docs), one process per core:

    .venv/bin/python tools/reproduce_control.py --mode full --parts fig3 fig14 &
    .venv/bin/python tools/reproduce_control.py --mode full --parts table2; wait
    .venv/bin/python tools/reproduce_control.py --report-only

Each part's numbers go to ``<out>/<part>.json``; ``results.md`` and the PNGs are then drawn from every part
file present, so ``--report-only`` redraws them without rerunning. ``--mode short`` is the CI-sized run
(tests/e2e/test_control_reproduction.py checks the direction of each result at that size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from megatron_opd.control.experiments import FULL, SHORT, run_fig3, run_fig14, run_table2
from megatron_opd.control.report import write_report

PARTS = {"fig3": run_fig3, "fig14": run_fig14, "table2": run_table2}


def load_results(out: Path) -> dict:
    """Every part result under ``out`` ({part: result}, plus {'meta': {part: run facts}})."""
    results: dict = {"meta": {}}
    for part in PARTS:
        f = out / f"{part}.json"
        if f.exists():
            rec = json.loads(f.read_text())
            results["meta"][part] = rec.pop("_meta")
            results[part] = rec
    return results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("short", "full"), default="short")
    ap.add_argument("--out", type=Path, default=Path("docs/control"))
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument(
        "--report-only", action="store_true", help="redraw results.md and plots from <out>/*.json"
    )
    ap.add_argument(
        "--ar-seeds",
        type=int,
        nargs="+",
        default=None,
        help="distillation seeds of Table 2 (default: the mode's; fewer for a reduced run on a busy machine)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        scale = FULL if args.mode == "full" else SHORT
        if args.ar_seeds is not None:
            scale = dataclasses.replace(scale, ar_seeds=tuple(args.ar_seeds))
        for part in args.parts:
            t0 = time.time()
            rec = PARTS[part](scale)
            rec["_meta"] = {
                "mode": args.mode,
                "ar_seeds": list(scale.ar_seeds),
                "wall_clock_s": round(time.time() - t0, 1),
                "threads": 1,
            }
            (args.out / f"{part}.json").write_text(json.dumps(rec))
    results = load_results(args.out)
    print(write_report(results, args.out))
    return results


if __name__ == "__main__":
    main()
