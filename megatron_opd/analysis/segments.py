"""Segment ablation (the paper's Fig. 12): distil one 10% slice of the rollout at a time.

Why it exists: to see where useful distillation signal sits along the response, the same run is repeated with
the ``segment`` horizon schedule (``algorithms.horizon.SegmentHorizon``: generate up to b, distil only [a, b)),
once per slice, and the final evaluation of each is compared. This module builds each run's overrides and
collects the results; ``tools/segment_ablation.py`` runs them with the training entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_STARTS = (0.0, 0.2, 0.4, 0.6, 0.8)
"""The paper's slices: 0-10%, 20-30%, ..., 80-90%."""


def segment_grid(starts: Sequence[float] = DEFAULT_STARTS, width: float = 0.1) -> list[tuple[float, float]]:
    """[(a, a + width)] for each start a, as fractions of the maximum response length."""
    out = []
    for a in starts:
        b = round(a + width, 6)
        if not 0.0 <= a < b <= 1.0:
            raise ValueError(f"segment [{a}, {b}) is not inside [0, 1]")
        out.append((float(a), b))
    return out


def segment_overrides(start: float, end: float) -> list[str]:
    """Command-line overrides selecting the segment schedule for [start, end) (fractions of T_max)."""
    return [
        "--horizon.schedule", "segment",
        "--horizon.segment_start", repr(start),
        "--horizon.segment_end", repr(end),
        "--horizon.segment_unit", "fraction",
    ]  # fmt: skip


def run_segment_ablation(
    train: Callable[[list[str]], dict[str, Any]],
    base_argv: list[str],
    segments: Sequence[tuple[float, float]],
    *,
    log_dir: str | None = None,
    include_full: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run ``train(base_argv + overrides)`` per segment (and once with the full horizon if asked).

    Returns {label: {"segment": [a, b] or None, "initial_eval": ..., "final": last step's scalars,
    "steps": every step's scalars}}; labels are like "0-10%" and "full".
    """
    runs: list[tuple[str, list[float] | None, list[str]]] = []
    if include_full:
        runs.append(("full", None, ["--horizon.schedule", "full"]))
    for a, b in segments:
        runs.append((f"{round(100 * a)}-{round(100 * b)}%", [a, b], segment_overrides(a, b)))
    out: dict[str, dict[str, Any]] = {}
    for label, seg, overrides in runs:
        argv = list(base_argv) + overrides
        if log_dir is not None:
            argv += ["--logging.log_dir", f"{log_dir}/{label.replace('%', 'pct')}"]
        res = train(argv)
        steps = res.get("steps", [])
        out[label] = {
            "segment": seg,
            "initial_eval": res.get("initial_eval", {}),
            "final": steps[-1] if steps else {},
            "steps": steps,
        }
    return out


def eval_table(results: dict[str, dict[str, Any]], metric_prefix: str = "eval/") -> str:
    """Markdown table of each run's final scalars whose names start with ``metric_prefix``."""
    keys = sorted({k for r in results.values() for k in r["final"] if k.startswith(metric_prefix)})
    init = next((r["initial_eval"] for r in results.values() if r["initial_eval"]), {})
    rows = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    if init:
        rows.append("| initial policy | " + " | ".join(_fmt(init.get(k)) for k in keys) + " |")
    for label, r in results.items():
        rows.append(f"| {label} | " + " | ".join(_fmt(r["final"].get(k)) for k in keys) + " |")
    return "\n".join(rows)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)
