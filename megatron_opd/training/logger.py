"""What a user sees during a run: phase timers with a progress bar, console lines, TensorBoard and a jsonl log.

Why it exists: OPD's cost story is told per phase (rollout, teacher, train, sync). Every step's scalars go to
TensorBoard and to ``metrics.jsonl`` (one JSON object per step, the input of ``tools/plot_run.py``), and a
short line goes to the console. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

PHASES = ("rollout", "teacher", "train", "sync")


def peak_memory_gb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU (GiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class RunLogger:
    """Per-step phase timing, progress display and metric sinks (rank 0 only)."""

    def __init__(
        self,
        *,
        log_dir: str | None,
        tensorboard_dir: str | None,
        enabled: bool,
        progress_bar: bool = True,
        total_steps: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.progress_bar = progress_bar and enabled and sys.stderr.isatty()
        self.total_steps = total_steps
        self.phase_seconds: dict[str, float] = {}
        self._start = time.time()
        self._writer = None
        self._jsonl = None
        self._prompts_jsonl = None
        if not enabled:
            return
        self._prompts_jsonl = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self._jsonl = _open_append(os.path.join(log_dir, "metrics.jsonl"))
            self._prompts_jsonl = _open_append(os.path.join(log_dir, "consumed_prompts.jsonl"))
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(tensorboard_dir)

    @contextmanager
    def phase(self, name: str, step: int) -> Iterator[None]:
        """Time one phase of a step; shows ``step k [rollout|teacher|train|sync]`` while it runs."""
        if self.progress_bar:
            done = PHASES.index(name) if name in PHASES else 0
            bar = "#" * done + "." * (len(PHASES) - done)
            total = f"/{self.total_steps}" if self.total_steps else ""
            sys.stderr.write(f"\rstep {step}{total} [{bar}] {name:<8}")
            sys.stderr.flush()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - t0

    def log(self, step: int, scalars: dict[str, float], *, console_keys: tuple[str, ...] = ()) -> None:
        """Write ``scalars`` (plus phase seconds, wall-clock and peak memory) for ``step``; reset the timers."""
        if not self.enabled:
            self.phase_seconds = {}
            return
        row = dict(scalars)
        for name, sec in self.phase_seconds.items():
            row[f"time/{name}_s"] = sec
        row["time/step_s"] = sum(self.phase_seconds.values())
        row["time/wall_clock_s"] = time.time() - self._start
        row["memory/peak_gb"] = peak_memory_gb()
        self.phase_seconds = {}
        if self._writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._writer.add_scalar(k, v, step)
            self._writer.flush()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **row}, allow_nan=True) + "\n")
            self._jsonl.flush()
        if self.progress_bar:
            sys.stderr.write("\r" + " " * 60 + "\r")
        keys = console_keys or tuple(k for k in row if k.startswith(("loss", "horizon/end", "time/step_s")))
        keys = tuple(keys) + tuple(k for k in row if "/avg@" in k and k not in keys)  # evaluations, when any
        parts = [f"{k}={_fmt(row[k])}" for k in keys if k in row]
        print(f"step {step:>5} | " + " | ".join(parts), flush=True)

    def log_prompts(self, step: int, epoch: int, indices: list[int]) -> None:
        """Append {step, epoch, indices} to ``consumed_prompts.jsonl``: which prompts step ``step`` trained on.

        A resumed run repeats the steps after its checkpoint, so the last line of a step is the one in the weights.
        """
        if self._prompts_jsonl is not None:
            self._prompts_jsonl.write(json.dumps({"step": step, "epoch": epoch, "indices": indices}) + "\n")
            self._prompts_jsonl.flush()

    def text(self, message: str) -> None:
        if self.enabled:
            if self.progress_bar:
                sys.stderr.write("\r" + " " * 60 + "\r")
            print(message, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._prompts_jsonl is not None:
            self._prompts_jsonl.close()


def _open_append(path: str):
    """Open a jsonl log for appending; a last line cut short by a killed run is ended first, so the resumed
    run's rows start on their own line (the cut line stays unparseable and readers skip it)."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    else:
        cut = False
    f = open(path, "a", encoding="utf-8")  # noqa: SIM115
    if cut:
        f.write("\n")
        f.flush()
    return f


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
