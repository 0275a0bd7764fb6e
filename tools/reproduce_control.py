"""Reproduce the paper's control-task results (Fig. 3, Fig. 14, Table 2, Fig. 8) and write them under docs/.

Thin wrapper over ``megatron_opd.control``. Full mode (the committed docs):

    OMP_NUM_THREADS=1 .venv/bin/python tools/reproduce_control.py --mode full --out docs/control

Short mode (what CI runs through tests/e2e/test_control_reproduction.py): ``--mode short``. ``--parts`` picks a
subset (fig3, fig14, table2); results.json holds every number, results.md and the PNGs are drawn from it, and
``--from-json`` redraws them without rerunning.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from megatron_opd.control.experiments import FULL, SHORT, run_fig3, run_fig14, run_table2
from megatron_opd.control.report import write_report

PARTS = ("fig3", "fig14", "table2")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("short", "full"), default="short")
    ap.add_argument("--out", type=Path, default=Path("docs/control"))
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--from-json", type=Path, default=None, help="redraw results.md and plots from this JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        print(write_report(results, args.out))
        return results
    scale = FULL if args.mode == "full" else SHORT
    t0 = time.time()
    results: dict = {}
    if "fig3" in args.parts:
        results["fig3"] = run_fig3(scale)
    if "fig14" in args.parts:
        results["fig14"] = run_fig14(scale)
    if "table2" in args.parts:
        results["table2"] = run_table2(scale)
    results["meta"] = {
        "command": f"tools/reproduce_control.py --mode {args.mode} --parts {' '.join(args.parts)}",
        "scale": repr(scale),
        "wall_clock_s": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results))
    print(write_report(results, args.out), f"({results['meta']['wall_clock_s']} s)")
    return results


if __name__ == "__main__":
    main()
