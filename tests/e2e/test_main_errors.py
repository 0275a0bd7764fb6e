"""The trainer and the conversion tool as a user runs them (subprocesses): an expected failure prints one line
``error: ...`` naming what and where, and exits with code 2 (issue 16 items 5, 6, 8)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from megatron_opd.rollout.tiny_model import make_tiny_pair

    return Path(make_tiny_pair(str(tmp_path_factory.mktemp("pair"))))


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # Megatron's import-time warnings (no Transformer Engine / Apex on this machine) are not the run's output.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _train(pair: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run(
        [
            sys.executable,
            "-m",
            "megatron_opd.training.main",
            "--model.hf_path",
            str(pair / "student"),
            "--teacher.hf_path",
            str(pair / "teacher"),
            "--train.data_path",
            str(pair / "data.jsonl"),
            "--train.apply_chat_template",
            "false",
            "--global-batch-size",
            "4",
            "--logging.progress_bar",
            "false",
            *extra,
        ]  # fmt: skip
    )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_a_bad_config_value_is_one_line(pair):
    line = _one_line_error(_train(pair, "--optimizer.lr", "-1e-4"))
    assert line == "error: config key 'optimizer.lr': got -0.0001; allowed: a number in (0.0, inf]"


def test_a_corrupt_student_safetensors_file_is_named(pair, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(pair / "student", student)
    weights = student / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    line = _one_line_error(_train(pair, "--model.hf_path", str(student)))
    assert line.startswith(f"error: {weights} is not a readable safetensors file (SafetensorError")
    assert "truncated or corrupt" in line


def test_an_unwritable_save_folder_fails_before_the_first_step(pair, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    log_dir = tmp_path / "logs"
    proc = _train(pair, "--checkpoint.save", str(blocker / "run"), "--logging.log_dir", str(log_dir))
    line = _one_line_error(proc)
    assert line.startswith(
        f"error: config key 'checkpoint.save': {blocker / 'run'} is not a writable directory"
    )
    assert not (log_dir / "metrics.jsonl").exists()  # no step ran


def test_the_conversion_tool_names_a_corrupt_file(pair, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(pair / "student", src)
    os.truncate(src / "model.safetensors", 100)
    proc = _run(
        [
            sys.executable,
            "tools/convert_hf_to_megatron.py",
            "--hf-dir",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]  # fmt: skip
    )
    # The tool logs at INFO level; its error is the last line and the only one starting with 'error:'.
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
    assert [x for x in lines if x.startswith("error: ")] == [lines[-1]]
    assert lines[-1].startswith(f"error: {src / 'model.safetensors'} is not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_the_eval_tool_names_a_missing_model(tmp_path):
    missing = tmp_path / "no-model"
    line = _one_line_error(_run([sys.executable, "tools/eval.py", "--hf-dir", str(missing)]))
    assert line == f"error: no *.safetensors weights in {missing}"
