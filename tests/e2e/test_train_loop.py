"""Whole OPD runs on tiny models: the loop obeys the horizon schedule, TP=2 x PP=2 reproduces one process, and a
killed run resumed with --checkpoint.load repeats the uninterrupted run's metrics."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_opd.utils.kill_resume import kill_run, marked_env
from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.e2e

T_MAX = 24


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from megatron_opd.rollout.tiny_model import make_tiny_pair

    return Path(make_tiny_pair(str(tmp_path_factory.mktemp("pair"))))


def _argv(d, schedule, *extra):
    horizon = {
        "full": [],
        "truncated": ["--horizon.rho", "0.25"],
        "progressive": ["--horizon.h0", "4", "--horizon.delta_h", "5", "--horizon.delta_k", "1"],
    }[schedule]
    return [
        "--model.hf_path", str(d / "student"),
        "--teacher.hf_path", str(d / "teacher"),
        "--train.data_path", str(d / "data.jsonl"),
        "--train.apply_chat_template", "false",
        "--global-batch-size", "4",
        "--n-samples-per-prompt", "2",
        "--micro-batch-size", "2",
        "--rollout.max_response_length", str(T_MAX),
        "--horizon.schedule", schedule, *horizon,
        "--lr", "1e-3",
        "--teacher.topk", "4",
        "--loss.topk_kl_coef", "0.5",
        "--loss.impl", "reference",
        "--logging.progress_bar", "false",
        *extra,
    ]  # fmt: skip


def _expected_horizon(schedule, step):
    return {"full": T_MAX, "truncated": 6, "progressive": min(T_MAX, 4 + 5 * step)}[schedule]


def _check_schedule(steps, schedule):
    assert len(steps) == 3
    for k, s in enumerate(steps):
        h = _expected_horizon(schedule, k)
        assert s["horizon/end"] == h
        assert s["rollout/response_length_max"] <= h  # generation stops at the horizon
        assert 0 < s["train/tokens"] <= 8 * h  # 4 prompts x 2 samples, only tokens inside the window
        assert s["train/loss"] == s["train/loss"]  # finite


def _layout_worker(rank, world, d):
    from megatron_opd.training.main import train

    out = {}
    for schedule in ("full", "progressive", "truncated"):
        res = train(
            _argv(d, schedule, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                  "--train.train_steps", "3")
        )  # fmt: skip
        out[schedule] = res["steps"]
    return out


@pytest.fixture(scope="module")
def single_process_runs(tiny_pair):
    return run_on_ranks(_single_worker, 1, tiny_pair)[0]


def _single_worker(rank, world, d):
    from megatron_opd.training.main import train

    return {
        s: train(_argv(d, s, "--train.train_steps", "3"))["steps"]
        for s in ("full", "progressive", "truncated")
    }


@pytest.mark.parametrize("schedule", ["full", "progressive", "truncated"])
def test_single_process_follows_the_schedule(single_process_runs, schedule):
    _check_schedule(single_process_runs[schedule], schedule)


def test_tp2_pp2_runs_opd_popd_topd_and_matches_one_process(tiny_pair, single_process_runs):
    results = run_on_ranks(_layout_worker, 4, tiny_pair)
    for schedule in ("full", "progressive", "truncated"):
        steps = results[0][schedule]
        _check_schedule(steps, schedule)
        ref = single_process_runs[schedule]
        # Same seeds -> same rollouts and teacher scores; the first step's loss is computed before any update,
        # from identical weights, so only the sharded reductions' summation order differs: 1e-4 relative.
        assert steps[0]["train/loss"] == pytest.approx(ref[0]["train/loss"], rel=1e-4, abs=1e-5)
        assert steps[0]["train/tokens"] == ref[0]["train/tokens"]
        for later in range(1, 3):
            assert steps[later]["train/loss"] == pytest.approx(ref[later]["train/loss"], rel=2e-2, abs=1e-3)
        # every rank reports the same metrics
        for r in results[1:]:
            assert r[schedule][-1]["train/loss"] == pytest.approx(steps[-1]["train/loss"], rel=1e-6)


def _read_metrics(path):
    with open(path) as f:
        return {row["step"]: row for row in map(json.loads, f) if "train/loss" in row}


def _phases_worker(rank, world, d):
    from megatron_opd.training import run as R
    from megatron_opd.training.main import train

    calls = {"generate": [], "sync": 0, "events": []}
    generate, sync, evaluate = R.generate_rollouts, R.sync_weights, R.evaluate

    def spy_generate(run, batches, window, step):
        calls["generate"].append((step, [list(b.indices) for b in batches], window.generate))
        return generate(run, batches, window, step)

    def spy_sync(run):
        calls["sync"] += 1
        calls["events"].append("sync")
        return sync(run)

    def spy_evaluate(run, step, *, teacher=False):  # records the order only (no evaluation set here)
        calls["events"].append(f"eval {step}")
        return {}

    R.generate_rollouts, R.sync_weights = spy_generate, spy_sync
    try:
        # greedy: a sample does not depend on how many rows share the engine call
        extra = ("--train.train_steps", "5", "--eval.at_start", "false", "--rollout.temperature", "0")
        steps = {k: train(_argv(d, "progressive", *extra, "--train.steps_per_rollout", str(k)))["steps"]
                 for k in (1, 2)}  # fmt: skip
        calls["events"].clear()
        R.evaluate = spy_evaluate
        train(_argv(d, "progressive", *extra, "--train.steps_per_rollout", "2", "--eval.eval_interval", "3"))
    finally:
        R.generate_rollouts, R.sync_weights, R.evaluate = generate, sync, evaluate
    return steps, calls


def test_steps_per_rollout_samples_several_steps_at_once(tiny_pair):
    """train.steps_per_rollout 2: one engine call per two steps with both steps' prompts (the sampler's order),
    cut at the horizon of the phase's first step, and the weights synced once per phase and before an
    evaluation that falls inside a phase."""
    steps, calls = run_on_ranks(_phases_worker, 1, tiny_pair)[0]
    one, two = calls["generate"][:5], calls["generate"][5:8]
    assert [c[0] for c in one] == [0, 1, 2, 3, 4] and [c[0] for c in two] == [0, 2, 4]
    assert [len(c[1]) for c in two] == [2, 2, 1]  # the last phase stops at the run's end
    assert [b for c in two for b in c[1]] == [b for c in one for b in c[1]]  # the same prompts, in order
    assert [c[2] for c in two] == [4, 14, 24]  # POPD H_k of each phase's first step
    assert [s["horizon/end"] for s in steps[2]] == [4, 4, 14, 14, 24]
    assert all(s["rollout/response_length_max"] <= s["horizon/end"] for s in steps[2])
    # setup's sync, then one per step (k = 1) or per phase (k = 2)
    assert calls["sync"] == (1 + 5) + (1 + 3) + (1 + 4)
    # the first step of a phase trains exactly as with k = 1 (same student, same greedy samples); the later differs
    assert steps[2][0]["train/loss"] == pytest.approx(steps[1][0]["train/loss"], rel=1e-6)
    assert steps[2][1]["horizon/end"] != steps[1][1]["horizon/end"]
    # evaluation after step 3, the first of the phase [3, 4]: the engine gets step 3's weights first
    # (setup, end of phase [1, 2], before the evaluation, end of phase [3, 4], end of the run)
    assert calls["events"] == ["sync", "sync", "sync", "eval 3", "sync", "sync", "eval 5"]


@pytest.mark.parametrize("k", [1, 2], ids=["every_step", "two_steps_per_rollout"])
def test_killed_run_resumes_with_identical_metrics(tiny_pair, tmp_path, k):
    base = [sys.executable, "-m", "megatron_opd.training.main", *_argv(tiny_pair, "progressive")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = [
        "--train.train_steps",
        "6",
        "--checkpoint.save_interval",
        "2",
        "--train.steps_per_rollout",
        str(k),
    ]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(
        [*base, *steps, "--checkpoint.save", str(ref_dir)], check=True, env=env, capture_output=True
    )

    run_env, run_marker = marked_env(env)
    proc = subprocess.Popen(
        [*base, *steps, "--checkpoint.save", str(run_dir)],
        env=run_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = run_dir / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while time.time() < deadline and not (marker.exists() and marker.read_text().strip() == "2"):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    # No clean-up: whatever was in flight is lost. The run had started helper processes (Megatron's checkpoint
    # writer queue, spawned at the first save); none of them may outlive it (kill_run raises naming survivors).
    assert kill_run(proc, run_marker) >= 1
    done_before_kill = _read_metrics(run_dir / "metrics.jsonl")
    assert 2 in done_before_kill and 6 not in done_before_kill

    subprocess.run(
        [*base, *steps, "--checkpoint.save", str(run_dir), "--checkpoint.load", str(run_dir)],
        check=True,
        env=env,
        capture_output=True,
    )
    ref = _read_metrics(ref_dir / "metrics.jsonl")
    resumed = _read_metrics(run_dir / "metrics.jsonl")  # appended: the resumed steps overwrite killed ones
    assert sorted(resumed) == list(range(1, 7))
    for step in range(3, 7):
        for key in (
            "train/loss",
            "train/log_ratio_mean",
            "train/topk_kl_mean",
            "horizon/end",
            "train/tokens",
        ):
            # Same weights, optimizer state, data order and per-step seeds: identical up to float noise.
            assert resumed[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), (step, key)
