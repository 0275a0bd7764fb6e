"""tools/eval.py scores an HF checkpoint and the same weights as a Megatron checkpoint identically."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_eval_tool_hf_and_megatron_give_the_same_scores(tmp_path):
    from megatron_opd.toy.models import ToyRecipe, make_toy_models

    recipe = ToyRecipe(digits=2, num_train_prompts=24, num_eval_problems=8, batch_size=16, teacher_steps=30,
                       student_steps=6, warmup_steps=5)  # fmt: skip
    toy = make_toy_models(recipe, cache_dir=str(tmp_path / "toy"))
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
    key = next(k for k in scores["hf"] if k.endswith("/avg@3"))
    assert 0.0 <= scores["hf"][key] <= 1.0
    # The export is bit-identical and sampling is seeded: the two scores are equal, not just close.
    assert scores["hf"] == scores["mcore"]
