"""Kill-and-resume harness: SIGKILL a training run at chosen points (after a step, inside a step, during a
checkpoint save), resume it with ``--checkpoint.load`` each time, and check that nothing was lost.

Why it exists: a distillation run holds days of cluster time and gets preempted. Resume must load the previous
complete checkpoint (never a half-written ``iter_*.tmp``), repeat the steps after it exactly, and end with the
metrics and data order of a run that was never interrupted. This module drives real training processes
(``python -m megatron_opd.training.main``) and checks all of that from the files a run leaves:
``metrics.jsonl`` (one row per step), ``consumed_prompts.jsonl`` (the prompt indices of each step) and the
checkpoint directory, and that no process of a killed run (its spawned helpers included) outlives it.
``tools/kill_resume_harness.py`` is the command line; ``tests/e2e/test_reliability_kill_resume.py``
runs the short mode in CI.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psutil

KillKind = Literal["after_step", "mid_step", "during_save"]

# The per-step metrics that must match an uninterrupted run after any number of kills.
CHECKED_KEYS = ("train/loss", "train/log_ratio_mean", "train/topk_kl_mean", "horizon/end", "train/tokens")

_RESUMED_RE = re.compile(r"resumed from .* at step (\d+)")
_NO_CKPT = "no checkpoint under"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
_TMP_RE = re.compile(r"^iter_(\d{7})\.tmp$")


@dataclass(frozen=True)
class KillPoint:
    """Where to kill one segment of the run.

    after_step: once step ``step``'s metrics row is written (right before its save when it saves).
    mid_step: at a uniformly random time inside step ``step`` (the previous step's duration as its length).
    during_save: once a checkpoint ``iter_XXXXXXX.tmp`` for an iteration >= ``step`` appears, after a random delay
    of at most ``max_save_delay_s`` (0 kills at the first sight of the directory).
    """

    kind: KillKind
    step: int


@dataclass
class KillRecord:
    """What one kill found: the rows the segment wrote, the checkpoint state left behind, what resume did."""

    point: KillPoint
    segment_seconds: float
    last_step_logged: int | None
    tmp_dirs_left: list[str]
    complete_iterations: list[int]
    expected_resume_step: int
    resumed_step: int | None = None
    helper_processes: int = 0  # processes the run had started (all gone after the kill, or the harness fails)


@dataclass
class HarnessReport:
    kills: list[KillRecord] = field(default_factory=list)
    total_steps: int = 0
    seconds: float = 0.0
    ok: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class HarnessError(AssertionError):
    """A reliability property did not hold (the message says which, at which step or kill)."""


# --------------------------------------------------------------------------------------------------------
# reading what a run leaves
# --------------------------------------------------------------------------------------------------------
def read_jsonl_rows(path: str) -> list[dict[str, Any]]:
    """Every parseable row in file order; a line cut by a SIGKILL mid-write is skipped (it ended no step)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def last_row_per_step(
    rows: Sequence[dict[str, Any]], require: str | None = None
) -> dict[int, dict[str, Any]]:
    """step -> its last row (a resumed run redoes the steps after its checkpoint; the last one is in the weights)."""
    out: dict[int, dict[str, Any]] = {}
    for row in rows:
        if "step" in row and (require is None or require in row):
            out[int(row["step"])] = row
    return out


def expected_resume_iteration(root: str) -> int:
    """The checkpoint a correct resume must load, found independently of ``training/checkpoint.py``: the
    iteration in ``latest_checkpointed_iteration.txt`` when its renamed directory exists, else the newest renamed
    directory, else 0 (no checkpoint). ``*.tmp`` directories never count."""
    if not os.path.isdir(root):
        return 0
    complete = sorted(int(m.group(1)) for n in os.listdir(root) if (m := _ITER_RE.match(n)))
    marker = os.path.join(root, "latest_checkpointed_iteration.txt")
    if os.path.exists(marker):
        text = open(marker, encoding="utf-8").read().strip()
        if text.isdigit() and int(text) in complete:
            return int(text)
    return complete[-1] if complete else 0


def _tmp_dirs(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if _TMP_RE.match(n)) if os.path.isdir(root) else []


# --------------------------------------------------------------------------------------------------------
# driving the processes
# --------------------------------------------------------------------------------------------------------
def _start(cmd: list[str], log_path: str, env: dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed by the caller via proc)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


# Every process of one started run carries this variable (inherited from the run's process), so the processes a
# run left behind are found by it, wherever the kernel re-parented them.
RUN_MARKER_ENV = "MEGATRON_OPD_KILL_TEST_RUN"


def marked_env(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """``env`` plus a marker unique to one run (pass it to the run's process); returns (env, marker)."""
    marker = f"{os.getpid()}-{time.monotonic_ns()}-{random.getrandbits(32):08x}"
    return {**env, RUN_MARKER_ENV: marker}, marker


def _processes_of(marker: str) -> list[psutil.Process]:
    """The live (not zombie) processes whose environment carries ``marker``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(RUN_MARKER_ENV) == marker:
                found.append(p)
        except psutil.Error:  # gone meanwhile, or another user's process
            continue
    return found


def kill_run(proc: subprocess.Popen, marker: str, *, grace_s: float = 30.0) -> int:
    """SIGKILL ``proc`` alone (no clean-up, as a preemption would) and check that no process of its run survives:
    every process in its tree just before the kill, and every process carrying its ``marker``, must be gone within
    ``grace_s`` (helpers die with their parent). Returns how many helper processes the run had; raises
    ``HarnessError`` naming the survivors."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + grace_s
    while True:
        alive = {p.pid: p for p in _processes_of(marker)}
        for p in tree:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive[p.pid] = p
            except psutil.Error:
                continue
        if not alive:
            return len(tree)
        if time.monotonic() > deadline:
            names = []
            for p in alive.values():
                try:
                    names.append(f"{p.pid} ({' '.join(p.cmdline())[:120]})")
                except psutil.Error:
                    names.append(str(p.pid))
            for p in alive.values():  # do not leave them for the next test either
                try:
                    p.kill()
                except psutil.Error:
                    pass
            raise HarnessError(
                f"{len(alive)} process(es) of the killed run outlived it by {grace_s:.0f} s: {'; '.join(names)}"
            )
        time.sleep(0.1)


def _tail(path: str, n: int = 40) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-n:])


def _new_rows(path: str, offset: int) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        f.seek(offset)
        text = f.read()
    rows = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _resumed_at(log_path: str) -> int | None:
    """The step this segment resumed at (0 when it found no checkpoint), once its log says so."""
    text = open(log_path, encoding="utf-8", errors="replace").read()
    m = _RESUMED_RE.search(text)
    return int(m.group(1)) if m else (0 if _NO_CKPT in text else None)


def _wait_and_kill(
    proc: subprocess.Popen,
    marker: str,
    point: KillPoint,
    run_dir: str,
    metrics_offset: int,
    rng: random.Random,
    *,
    max_save_delay_s: float,
    timeout_s: float,
    log_path: str,
) -> int:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout_s
    kill_at: float | None = None
    while True:
        if proc.poll() is not None:
            raise HarnessError(
                f"the run ended (rc {proc.returncode}) before kill point {point} was reached:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise HarnessError(f"kill point {point} not reached in {timeout_s:.0f} s:\n{_tail(log_path)}")
        if kill_at is None:
            if point.kind == "during_save":
                tmps = [int(_TMP_RE.match(n).group(1)) for n in _tmp_dirs(run_dir)]
                if any(it >= point.step for it in tmps):
                    kill_at = time.monotonic() + rng.uniform(0.0, max_save_delay_s)
            else:
                steps = {int(r["step"]): r for r in _new_rows(metrics, metrics_offset) if "train/loss" in r}
                if point.kind == "after_step" and point.step in steps:
                    kill_at = time.monotonic()
                elif point.kind == "mid_step" and point.step - 1 in steps:
                    length = float(steps[point.step - 1].get("time/step_s", 0.2))
                    kill_at = time.monotonic() + rng.uniform(0.0, length)
                elif point.kind == "mid_step" and _resumed_at(log_path) == point.step - 1:
                    kill_at = time.monotonic() + rng.uniform(0.0, 0.3)  # step k follows the resume at once
        if kill_at is not None and time.monotonic() >= kill_at:
            return kill_run(
                proc, marker
            )  # no clean-up: whatever was in flight is lost; no helper may survive
        time.sleep(0.002)


def run_harness(
    train_args: Sequence[str],
    work_dir: str,
    kill_points: Sequence[KillPoint],
    *,
    seed: int = 0,
    max_save_delay_s: float = 0.05,
    segment_timeout_s: float = 600.0,
    rel_tol: float = 1e-5,
    python: str = sys.executable,
) -> HarnessReport:
    """Run ``train_args`` once uninterrupted (into ``work_dir/ref``, concurrently) and once with a SIGKILL at each
    of ``kill_points`` in order, each followed by a resume with ``--checkpoint.load`` (into ``work_dir/killed``).

    ``train_args`` are ``megatron_opd.training.main`` arguments without ``--checkpoint.save/load``; they must
    save checkpoints (``--checkpoint.save_interval``) and log every step. Raises ``HarnessError`` naming the
    first property that failed; returns the report of every kill otherwise.
    """
    t0 = time.monotonic()
    rng = random.Random(seed)
    ref_dir, run_dir = os.path.join(work_dir, "ref"), os.path.join(work_dir, "killed")
    os.makedirs(work_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    base = [python, "-m", "megatron_opd.training.main", *train_args]
    ref_log = os.path.join(work_dir, "ref.log")
    ref = _start([*base, "--checkpoint.save", ref_dir], ref_log, env)

    report = HarnessReport()
    metrics = os.path.join(run_dir, "metrics.jsonl")
    expected = 0
    try:
        for i, point in enumerate([*kill_points, None]):
            seg_log = os.path.join(work_dir, f"segment{i:02d}.log")
            offset = os.path.getsize(metrics) if os.path.exists(metrics) else 0
            seg_t0 = time.monotonic()
            # The run resumes itself (load = save); before its first save the folder holds no checkpoint yet.
            os.makedirs(run_dir, exist_ok=True)
            resume = ["--checkpoint.load", run_dir, "--checkpoint.allow_empty_load", "true"]
            seg_env, marker = marked_env(env)
            proc = _start([*base, "--checkpoint.save", run_dir, *resume], seg_log, seg_env)
            helpers = 0
            if point is None:
                if proc.wait(timeout=segment_timeout_s) != 0:
                    raise HarnessError(f"the final resumed segment failed:\n{_tail(seg_log)}")
            else:
                helpers = _wait_and_kill(
                    proc,
                    marker,
                    point,
                    run_dir,
                    offset,
                    rng,
                    max_save_delay_s=max_save_delay_s,
                    timeout_s=segment_timeout_s,
                    log_path=seg_log,
                )
            _check_resume(seg_log, expected, i, report)
            if point is None:
                break
            logged = [int(r["step"]) for r in _new_rows(metrics, offset) if "train/loss" in r]
            expected = expected_resume_iteration(run_dir)
            report.kills.append(
                KillRecord(
                    point=point,
                    segment_seconds=round(time.monotonic() - seg_t0, 2),
                    last_step_logged=max(logged) if logged else None,
                    tmp_dirs_left=_tmp_dirs(run_dir),
                    complete_iterations=sorted(
                        int(m.group(1)) for n in os.listdir(run_dir) if (m := _ITER_RE.match(n))
                    )
                    if os.path.isdir(run_dir)
                    else [],
                    expected_resume_step=expected,
                    helper_processes=helpers,
                )
            )
        if ref.wait(timeout=segment_timeout_s) != 0:
            raise HarnessError(f"the uninterrupted reference run failed:\n{_tail(ref_log)}")
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()

    report.total_steps = check_same_run(ref_dir, run_dir, rel_tol=rel_tol)
    report.seconds = round(time.monotonic() - t0, 1)
    report.ok = True
    return report


def _check_resume(seg_log: str, expected: int, segment: int, report: HarnessReport) -> None:
    """The segment's first lines say which checkpoint it loaded; it must be the one found after the kill."""
    if segment == 0:
        return
    got = _resumed_at(seg_log)
    report.kills[segment - 1].resumed_step = got
    if got != expected:
        raise HarnessError(
            f"after kill {segment} ({report.kills[segment - 1].point}) resume loaded step {got}, expected the "
            f"previous complete checkpoint {expected}:\n{_tail(seg_log)}"
        )


# --------------------------------------------------------------------------------------------------------
# the end-state checks
# --------------------------------------------------------------------------------------------------------
def check_same_run(ref_dir: str, run_dir: str, *, rel_tol: float = 1e-5) -> int:
    """The killed-and-resumed run equals the uninterrupted one: same steps, same metrics (within ``rel_tol``),
    the same prompts at every step, each epoch's prompts distinct, and every replayed step consumed exactly the
    prompts it consumed before the kill. Returns the number of steps."""
    ref = last_row_per_step(read_jsonl_rows(os.path.join(ref_dir, "metrics.jsonl")), "train/loss")
    got = last_row_per_step(read_jsonl_rows(os.path.join(run_dir, "metrics.jsonl")), "train/loss")
    if sorted(got) != sorted(ref) or sorted(ref) != list(range(1, len(ref) + 1)):
        raise HarnessError(f"steps differ: resumed run has {sorted(got)}, uninterrupted {sorted(ref)}")
    for step in ref:
        for key in CHECKED_KEYS:
            a, b = got[step].get(key), ref[step].get(key)
            if (a is None) != (b is None) or (a is not None and abs(a - b) > rel_tol * max(abs(b), 1e-1)):
                raise HarnessError(f"step {step} {key}: resumed {a} vs uninterrupted {b} (rel_tol {rel_tol})")

    ref_p = read_jsonl_rows(os.path.join(ref_dir, "consumed_prompts.jsonl"))
    run_p = read_jsonl_rows(os.path.join(run_dir, "consumed_prompts.jsonl"))
    final = last_row_per_step(run_p)
    if last_row_per_step(ref_p) != final:
        raise HarnessError("the resumed run's prompts per step differ from the uninterrupted run's")
    for row in run_p:  # a step redone after a resume consumed the same prompts as before the kill
        if row != final[int(row["step"])]:
            raise HarnessError(
                f"step {row['step']} consumed {row['indices']} before a kill, later {final[row['step']]}"
            )
    by_epoch: dict[int, list[int]] = {}
    for step in sorted(final):
        by_epoch.setdefault(int(final[step]["epoch"]), []).extend(final[step]["indices"])
    for epoch, ids in by_epoch.items():
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise HarnessError(f"epoch {epoch}: prompts {dup} seen twice")
    full = [e for e in by_epoch if e < max(by_epoch)]  # every epoch but the last one is complete
    if full and len({len(by_epoch[e]) for e in full}) != 1:
        raise HarnessError(f"complete epochs consumed different numbers of prompts: {by_epoch}")
    return len(ref)


# --------------------------------------------------------------------------------------------------------
# the two shipped scenarios on a tiny student/teacher pair
# --------------------------------------------------------------------------------------------------------
# CI: two kills over 8 steps (one epoch boundary); tests/e2e/test_train_loop.py already kills after a step.
CI_POINTS = [KillPoint("during_save", 4), KillPoint("mid_step", 7)]
CI_STEPS, LONG_STEPS = 8, 18
LONG_POINTS = [
    KillPoint("after_step", 1),  # before any checkpoint: resume starts afresh
    KillPoint("during_save", 2),
    KillPoint("mid_step", 4),
    KillPoint("after_step", 5),
    KillPoint("during_save", 6),
    KillPoint("mid_step", 7),  # first step of epoch 2
    KillPoint("during_save", 8),
    KillPoint("after_step", 10),
    KillPoint("mid_step", 12),
    KillPoint("during_save", 14),
    KillPoint("after_step", 15),
    KillPoint("mid_step", 17),
]


def make_tiny_setup(work_dir: str, *, num_prompts: int = 24) -> list[str]:
    """A tiny student/teacher pair and prompt file under ``work_dir`` (made once); returns training arguments
    for 4 prompts x 2 samples per step (6 steps an epoch over 24 prompts), POPD, top-K KL, every-step logging."""
    from megatron_opd.rollout.tiny_model import make_tiny_pair

    pair = make_tiny_pair(os.path.join(work_dir, "pair"), num_prompts=num_prompts)
    return [
        "--model.hf_path", os.path.join(pair, "student"),
        "--teacher.hf_path", os.path.join(pair, "teacher"),
        "--train.data_path", os.path.join(pair, "data.jsonl"),
        "--train.apply_chat_template", "false",
        "--global-batch-size", "4", "--n-samples-per-prompt", "2", "--micro-batch-size", "2",
        "--rollout.max_response_length", "16",
        "--horizon.schedule", "progressive", "--horizon.h0", "4", "--horizon.delta_h", "4",
        "--horizon.delta_k", "1",
        "--lr", "1e-3", "--teacher.topk", "4", "--loss.topk_kl_coef", "0.5", "--loss.impl", "reference",
        "--logging.progress_bar", "false", "--logging.log_interval", "1",
        "--checkpoint.keep_last", "2",
    ]  # fmt: skip
