"""Kill and resume (issue 9): SIGKILL a training run during a checkpoint save and inside a step, resume with
--checkpoint.load each time; the previous complete checkpoint loads (never a half-written ``iter_*.tmp``), no
prompt is lost or seen twice within an epoch, every step's metrics equal an uninterrupted run's, and no process
of a killed run outlives it (issue 16).
The long mode (12 kills) is ``python tools/kill_resume_harness.py --mode long``; see docs/reliability.md."""

import json

import pytest

from megatron_opd.utils.kill_resume import (
    CI_POINTS,
    CI_STEPS,
    HarnessError,
    check_same_run,
    expected_resume_iteration,
    make_tiny_setup,
    run_harness,
)

pytestmark = pytest.mark.e2e


def test_kills_during_save_and_mid_step_lose_nothing(tmp_path):
    args = make_tiny_setup(str(tmp_path)) + [
        "--train.train_steps", str(CI_STEPS), "--checkpoint.save_interval", "2",
    ]  # fmt: skip
    report = run_harness(args, str(tmp_path), CI_POINTS, seed=0)
    assert report.ok and report.total_steps == CI_STEPS
    assert len(report.kills) == len(CI_POINTS)
    for kill in report.kills:
        # each resume loaded the newest complete checkpoint at the time of the kill, none after the kill point
        assert kill.resumed_step == kill.expected_resume_step
        assert kill.resumed_step in kill.complete_iterations
        assert kill.resumed_step <= (kill.last_step_logged or 0)
        # Each killed segment had saved, so it had started Megatron's checkpoint-writer helpers; the harness
        # checked that none of them (nor anything else carrying the run's marker) outlived the kill.
        assert kill.helper_processes >= 1
    save_kill = report.kills[0]
    assert save_kill.point.kind == "during_save"
    if save_kill.tmp_dirs_left:  # the kill landed before the rename: the half-written save is not the latest
        assert all(int(t[5:12]) > save_kill.resumed_step for t in save_kill.tmp_dirs_left)

    # The checks can fail: a replayed step with other prompts, or a changed metric, is caught.
    run = tmp_path / "killed"
    rows = [json.loads(x) for x in (run / "consumed_prompts.jsonl").read_text().splitlines()]
    rows[-1]["indices"] = rows[-1]["indices"][::-1]
    (run / "consumed_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(HarnessError, match="prompts per step differ"):
        check_same_run(str(tmp_path / "ref"), str(run))


def test_expected_resume_ignores_tmp_and_falls_back_without_marker(tmp_path):
    assert expected_resume_iteration(str(tmp_path)) == 0
    for name in ("iter_0000002", "iter_0000004", "iter_0000006.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    assert expected_resume_iteration(str(tmp_path)) == 2  # killed between rename and marker: the marker wins
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("6")  # marker naming a .tmp is not trusted
    assert expected_resume_iteration(str(tmp_path)) == 4
