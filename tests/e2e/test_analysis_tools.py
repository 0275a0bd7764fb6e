"""tools/position_kl.py and tools/prefix_continuation.py end to end on tiny random models and a prompt file."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_opd.rollout.tiny_model import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    make_tiny_hf_model(str(d / "student"), seed=0)
    make_tiny_hf_model(str(d / "teacher"), seed=1)
    with open(d / "data.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"t{3 + i} t{10 + i} t{20 + i}", "answer": "t5"}) + "\n")
    return d


def test_position_kl_tool(setup, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = _tool("position_kl").main(
            ["--student", str(setup / "student"), "--teacher", str(setup / "teacher"), "--data",
             str(setup / "data.jsonl"), "--no-chat-template", "--num-prompts", "3", "--n", "2",
             "--max-new-tokens", "10", "--buckets", "5", "--out", str(tmp_path)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert res["num_prompts"] == 3 and res["counts"][0] == 6
    assert len(res["bucket_mean_kl"]) == 5 and res["bucket_mean_kl"][0] > 0
    assert (tmp_path / "position_kl.png").stat().st_size > 1000
    assert json.loads((tmp_path / "position_kl.json").read_text())["mean_kl"] == res["mean_kl"]


def test_prefix_continuation_tool(setup, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = _tool("prefix_continuation").main(
            ["--student", str(setup / "student"), "--teacher", str(setup / "teacher"), "--data",
             str(setup / "data.jsonl"), "--no-chat-template", "--ratios", "0", "0.5", "--n", "2",
             "--max-new-tokens", "8", "--checker", "exact", "--out", str(tmp_path)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert set(res["accuracy"]) == {"0.0", "0.5"}
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    assert (tmp_path / "prefix_continuation.png").stat().st_size > 1000


def _segment_worker(rank, world, d, out):
    argv = [
        "--out", out, "--starts", "0.0", "0.5", "--width", "0.1", "--",
        "--model.hf_path", str(d / "student"),
        "--teacher.hf_path", str(d / "teacher"),
        "--train.data_path", str(d / "data.jsonl"),
        "--train.apply_chat_template", "false",
        "--global-batch-size", "4",
        "--n-samples-per-prompt", "2",
        "--micro-batch-size", "2",
        "--rollout.max_response_length", "20",
        "--lr", "1e-3",
        "--loss.impl", "reference",
        "--logging.progress_bar", "false",
        "--train.train_steps", "2",
    ]  # fmt: skip
    return _tool("segment_ablation").main(argv)


def test_segment_ablation_tool(setup, tmp_path):
    from megatron_opd.utils.spawn import run_on_ranks

    res = run_on_ranks(_segment_worker, 1, setup, str(tmp_path))[0]
    assert list(res) == ["0-10%", "50-60%"]
    for label, (a, b) in (("0-10%", (0, 2)), ("50-60%", (10, 12))):
        steps = res[label]["steps"]
        assert len(steps) == 2
        for s in steps:
            assert (s["horizon/start"], s["horizon/end"]) == (a, b)  # distil [a, b) of T_max = 20
            assert 0 < s["train/tokens"] <= 4 * 2 * (b - a)
    assert (tmp_path / "segments.md").exists() and (tmp_path / "0-10pct" / "metrics.jsonl").exists()
