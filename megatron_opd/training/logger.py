"""What a user sees during a run: phase timers with a progress bar, console lines, TensorBoard and a jsonl log.

Why it exists: OPD's cost story is told per phase (rollout, teacher, train, sync). Every step's scalars go to
TensorBoard and to ``metrics.jsonl`` (one JSON object per step, the input of ``tools/plot_run.py``), and a
short line goes to the console and to ``log.txt`` beside them. On a terminal a progress bar (tqdm) shows the
step, its phase, the rate and the time left; without one (a pipe, a batch job) every console line carries
``step k/N`` and the time left instead. Only rank 0 writes.
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
TEXT_LOG = "log.txt"


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
        self.log_dir, self.tensorboard_dir = log_dir, tensorboard_dir
        self.phase_seconds: dict[str, float] = {}
        self._phase_names: set[str] = set()  # every phase timed so far: time/step_s is their sum
        self._start = time.time()
        self._first_step: int | None = (
            None  # the first step logged by this process (a resumed run starts late)
        )
        self._first_step_time = 0.0
        self._bar = None
        self._writer = None
        self._jsonl = None
        self._prompts_jsonl = None
        self._text = None
        if not enabled:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self._jsonl = _open_append(os.path.join(log_dir, "metrics.jsonl"))
            self._prompts_jsonl = _open_append(os.path.join(log_dir, "consumed_prompts.jsonl"))
            self._text = _open_append(os.path.join(log_dir, TEXT_LOG))
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(tensorboard_dir)

    def outputs(self, checkpoint_dir: str | None = None) -> str:
        """One line saying where this run writes (logs, TensorBoard, checkpoints)."""
        parts = []
        if self.log_dir:
            parts.append(f"logs {self.log_dir}/ (metrics.jsonl, {TEXT_LOG})")
        if self.tensorboard_dir:
            parts.append(f"TensorBoard {self.tensorboard_dir}")
        parts.append(
            f"checkpoints {checkpoint_dir}" if checkpoint_dir else "no checkpoints (checkpoint.save unset)"
        )
        return (
            "; ".join(parts) if self.log_dir else "no log folder (logging.log_dir unset); " + "; ".join(parts)
        )

    def _progress(self, step: int, phase: str) -> None:
        """The terminal's progress bar: created at the first phase, advanced to ``step``, labelled by ``phase``."""
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=step,
                unit="step",
                desc="OPD",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self._bar.set_postfix_str(phase, refresh=True)

    def _eta(self, step: int) -> str:
        """``k/N, eta H:MM:SS`` from this process's mean wall-clock per step (evaluations included)."""
        if self._first_step is None:
            self._first_step, self._first_step_time = step - 1, self._start
        done = step - self._first_step
        if not self.total_steps or done <= 0:
            return ""
        left = (time.time() - self._first_step_time) / done * max(self.total_steps - step, 0)
        return f"{step}/{self.total_steps}, eta {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"

    @contextmanager
    def phase(self, name: str, step: int) -> Iterator[None]:
        """Time one phase of a step; on a terminal the progress bar shows the phase while it runs."""
        if self.progress_bar:
            self._progress(step, name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - t0
            self._phase_names.add(name)

    def end_step(self) -> dict[str, float]:
        """This step's seconds per phase as ``time/<phase>_s`` scalars; the timers restart for the next step.

        Called once per step whether or not the step is logged, so a step's times are its own even when
        ``logging.log_interval`` skips the lines in between."""
        out = {f"time/{name}_s": sec for name, sec in self.phase_seconds.items()}
        self.phase_seconds = {}
        return out

    def log(self, step: int, scalars: dict[str, float], *, console_keys: tuple[str, ...] = ()) -> None:
        """Write ``scalars`` (plus the phase seconds not yet taken by ``end_step``, wall-clock and peak memory) for
        ``step``; reset the timers."""
        phases = self.end_step()
        if not self.enabled:
            return
        row = {**phases, **scalars}
        row["time/step_s"] = sum(row.get(f"time/{name}_s", 0.0) for name in self._phase_names)
        row["time/wall_clock_s"] = time.time() - self._start
        row["memory/peak_gb"] = peak_memory_gb()
        if self._writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._writer.add_scalar(k, v, step)
            self._writer.flush()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **row}, allow_nan=True) + "\n")
            self._jsonl.flush()
        keys = console_keys or tuple(k for k in row if k.startswith(("loss", "horizon/end", "time/step_s")))
        keys = tuple(keys) + tuple(k for k in row if "/avg@" in k and k not in keys)  # evaluations, when any
        parts = [f"{k}={_fmt(row[k])}" for k in keys if k in row]
        eta = self._eta(step) if step > 0 else ""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()
        elif eta:
            parts.append(eta)
        self._print(f"step {step:>5} | " + " | ".join(parts))

    def log_prompts(self, step: int, epoch: int, indices: list[int]) -> None:
        """Append {step, epoch, indices} to ``consumed_prompts.jsonl``: which prompts step ``step`` trained on.

        A resumed run repeats the steps after its checkpoint, so the last line of a step is the one in the weights.
        """
        if self._prompts_jsonl is not None:
            self._prompts_jsonl.write(json.dumps({"step": step, "epoch": epoch, "indices": indices}) + "\n")
            self._prompts_jsonl.flush()

    def text(self, message: str) -> None:
        """A line for the console and ``log.txt`` (rank 0)."""
        if self.enabled:
            self._print(message)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)  # above the bar, which stays at the bottom
            sys.stdout.flush()
        else:
            print(line, flush=True)
        if self._text is not None:
            self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            self._text.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._text is not None:
            self._text.close()
            self._text = None
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
