"""tools/eval.py scores an HF checkpoint and the same weights as a Megatron checkpoint identically."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_eval_tool_hf_and_megatron_give_the_same_scores(tmp_path, tiny_toy_models):
    toy = tiny_toy_models[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_hf_to_megatron.py"), "--hf-dir", toy.student,
         "--out", str(tmp_path / "mcore")],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    common = ["--eval.datasets", toy.eval_spec, "--eval.n_samples", "3", "--rollout.max_response_length", "32",
              "--train.apply_chat_template", "false"]  # fmt: skip
    scores = {}
    for name, source in (
        ("hf", ["--hf-dir", toy.student]),
        ("mcore", ["--megatron-ckpt", str(tmp_path / "mcore")]),
    ):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "eval.py"), *source, *common, "--json", str(out)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "avg@3" in proc.stdout
        scores[name] = json.loads(out.read_text())
    length = next(v for k, v in scores["hf"].items() if k.endswith("/response_length"))
    assert length > 0  # real responses were generated, so equal lengths below mean equal generations
    # The export is bit-identical and sampling is seeded: every score (accuracy, pass@k, mean response length,
    # truncation rate) is equal, not just close; the accuracy alone could agree by both being 0.
    assert scores["hf"] == scores["mcore"]


def test_eval_tool_run_folder_uses_the_runs_checkpoint_and_eval_sets(tmp_path):
    """--run RUN_DIR: the newest checkpoint of a real (1-step) run, evaluated on the run's own set and k."""
    from megatron_opd.rollout.tiny_model import make_tiny_pair

    pair = make_tiny_pair(str(tmp_path / "pair"))
    eval_file = tmp_path / "tiny_eval.jsonl"
    eval_file.write_text(
        "".join(json.dumps({"prompt": f"t{i} t{i + 1}", "answer": "t5"}) + "\n" for i in range(2, 6))
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "megatron_opd.training.main",
         "--model.hf_path", os.path.join(pair, "student"), "--teacher.hf_path", os.path.join(pair, "teacher"),
         "--train.data_path", os.path.join(pair, "data.jsonl"), "--train.apply_chat_template", "false",
         "--global-batch-size", "2", "--n-samples-per-prompt", "2", "--micro-batch-size", "2",
         "--train.train_steps", "1", "--rollout.max_response_length", "8", "--horizon.schedule", "full", "--loss.impl", "reference",
         "--teacher.topk", "0", "--logging.progress_bar", "false", "--logging.log_dir", str(run_dir),
         "--checkpoint.save", str(run_dir / "ckpt"),
         "--eval.datasets", f"exact:{eval_file}", "--eval.n_samples", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "scores.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "eval.py"), "--run", str(run_dir), "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter_0000001" in proc.stdout  # the run's checkpoint, not some default model
    scores = json.loads(out.read_text())
    assert any(k.endswith("/avg@2") for k in scores), scores  # the run's k, not the default avg@16
    assert "note: evaluating the default sets" not in proc.stdout


def test_eval_tool_run_folder_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("checkpoint:\n  save: null\n")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "eval.py"), "--run", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "saved no complete checkpoint" in proc.stderr
