"""Logs a killed run leaves (issue 9): a metrics line cut by a SIGKILL mid-write does not swallow the resumed
run's first row, and every step's prompt indices are recorded for the no-prompt-lost check."""

import json

from megatron_opd.training.logger import RunLogger
from megatron_opd.utils.kill_resume import last_row_per_step, read_jsonl_rows


def test_a_line_cut_by_a_kill_does_not_swallow_the_resumed_rows(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "train/loss": 1.0}) + '\n{"step": 2, "train/lo'
    )
    log = RunLogger(log_dir=str(tmp_path), tensorboard_dir=None, enabled=True, progress_bar=False)
    log.log(2, {"train/loss": 2.0})
    log.log_prompts(2, 0, [5, 1, 3])
    log.close()
    rows = read_jsonl_rows(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["train/loss"] == 2.0  # the cut line is skipped
    prompts = read_jsonl_rows(str(tmp_path / "consumed_prompts.jsonl"))
    assert prompts == [{"step": 2, "epoch": 0, "indices": [5, 1, 3]}]


def test_the_last_row_of_a_replayed_step_wins():
    rows = [{"step": 1, "x": 1}, {"step": 2, "x": 2}, {"step": 2, "x": 3}, {"step": 3}]
    assert last_row_per_step(rows, "x") == {1: {"step": 1, "x": 1}, 2: {"step": 2, "x": 3}}
