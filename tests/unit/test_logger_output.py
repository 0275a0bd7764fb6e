"""training/logger.py as a user sees it: a progress bar on a terminal, step k/N and time left otherwise, log.txt."""

import io
import sys

from megatron_opd.training.logger import PHASES, RunLogger


def _steps(log: RunLogger, first: int, last: int) -> None:
    for step in range(first, last):
        for ph in PHASES:
            with log.phase(ph, step):
                pass
        log.log(step + 1, {"loss": 0.5})


def test_plain_lines_carry_progress_and_go_to_the_text_log(tmp_path, capsys):
    log = RunLogger(
        log_dir=str(tmp_path), tensorboard_dir=None, enabled=True, progress_bar=True, total_steps=10
    )
    assert not log.progress_bar  # pytest's stderr is not a terminal: plain lines
    log.text("megatron-opd: hello")
    _steps(log, 0, 3)
    log.close()
    out = capsys.readouterr().out
    assert "step     3 | loss=0.5 | " in out and "| 3/10, eta 0:00:00" in out
    text = (tmp_path / "log.txt").read_text()
    assert "megatron-opd: hello" in text and "step     3 | loss=0.5" in text
    # a resumed run appends to the same text log
    log = RunLogger(log_dir=str(tmp_path), tensorboard_dir=None, enabled=True, total_steps=10)
    log.text("resumed from somewhere at step 3")
    log.close()
    assert (tmp_path / "log.txt").read_text().startswith(text)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_progress_bar_with_the_phase(tmp_path, monkeypatch, capsys):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    log = RunLogger(log_dir=str(tmp_path), tensorboard_dir=None, enabled=True, total_steps=4)
    assert log.progress_bar
    _steps(log, 0, 2)
    log.close()
    bar = term.getvalue()
    assert "OPD" in bar and "/4" in bar and "sync" in bar  # the bar, its total and the phase shown
    out = capsys.readouterr().out
    assert "step     2 | loss=0.5" in out and "eta" not in out  # the bar shows the time left, not the lines


def test_outputs_names_every_destination(tmp_path):
    log = RunLogger(log_dir=str(tmp_path / "run"), tensorboard_dir=str(tmp_path / "tb"), enabled=True)
    line = log.outputs(str(tmp_path / "ckpt"))
    assert f"{tmp_path}/run/ (metrics.jsonl, log.txt)" in line and "tb" in line and "ckpt" in line
    assert "no checkpoints" in log.outputs(None)
    log.close()


def test_each_step_gets_its_own_phase_seconds_when_lines_are_skipped(tmp_path, monkeypatch):
    """logging.log_interval > 1: the steps between two logged lines must not add up into the next one."""
    from megatron_opd.training import logger as L

    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(L.time, "perf_counter", lambda: next(clock))
    log = RunLogger(log_dir=str(tmp_path), tensorboard_dir=None, enabled=True, total_steps=3)
    per_step = []
    for step in range(3):
        with log.phase("train", step):  # each phase lasts exactly 1 fake second
            pass
        per_step.append(log.end_step())
    assert per_step == [{"time/train_s": 1.0}] * 3
    log.log(3, per_step[-1])
    log.close()
    row = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"time/train_s": 1.0' in row and '"time/step_s": 1.0' in row
