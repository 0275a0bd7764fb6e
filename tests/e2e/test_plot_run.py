"""``tools/plot_run.py`` on a real run's output: a tiny OPD run with evaluation logs accuracy, the horizon and the
KL by response position, and the plot tool draws all three from its ``metrics.jsonl``."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

T_MAX = 16
BUCKETS = 4


def _plot_tool():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "plot_run.py")
    spec = importlib.util.spec_from_file_location("plot_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def popd_run(tmp_path_factory):
    from megatron_opd.rollout.tiny_model import make_tiny_pair

    d = make_tiny_pair(str(tmp_path_factory.mktemp("pair")))
    run_dir = tmp_path_factory.mktemp("runs") / "popd"
    argv = [
        sys.executable, "-m", "megatron_opd.training.main",
        "--model.hf_path", os.path.join(d, "student"),
        "--teacher.hf_path", os.path.join(d, "teacher"),
        "--train.data_path", os.path.join(d, "data.jsonl"),
        "--train.apply_chat_template", "false",
        "--global-batch-size", "4", "--n-samples-per-prompt", "2", "--micro-batch-size", "4",
        "--rollout.max_response_length", str(T_MAX),
        "--horizon.schedule", "progressive", "--horizon.h0", "4", "--horizon.delta_h", "4", "--horizon.delta_k", "1",
        "--teacher.topk", "4", "--loss.topk_kl_coef", "1.0", "--loss.impl", "reference",
        "--lr", "1e-3", "--train.train_steps", "4",
        "--eval.datasets", f"exact:{os.path.join(d, 'data.jsonl')}", "--eval.max_problems", "4",
        "--eval.n_samples", "2", "--eval.eval_interval", "2", "--eval.at_start", "true",
        "--eval.eval_teacher", "true",
        "--logging.log_dir", str(run_dir), "--logging.kl_position_buckets", str(BUCKETS),
        "--logging.progress_bar", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_logs_kl_by_position_bucket_of_t_max(popd_run):
    rows = [json.loads(x) for x in open(popd_run / "metrics.jsonl")]
    train = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(train) == [1, 2, 3, 4]
    for step, r in train.items():
        h = min(
            T_MAX, 4 + 4 * (step - 1)
        )  # POPD window of this step: buckets of T_MAX / BUCKETS = 4 positions
        filled = [b for b in range(BUCKETS) if r[f"opd_by_position/tokens_b{b:02d}"] > 0]
        assert filled == list(range(-(-h // 4))), (step, filled)
        assert sum(r[f"opd_by_position/tokens_b{b:02d}"] for b in range(BUCKETS)) == r["train/tokens"]
        for b in filled:
            # the k1 estimate is the negated mean log-ratio; the top-K KL is a KL, so >= 0
            assert r[f"opd_by_position/kl_b{b:02d}"] == pytest.approx(
                -r[f"opd_by_position/log_ratio_b{b:02d}"]
            )
            assert r[f"opd_by_position/topk_kl_b{b:02d}"] >= 0
        for b in set(range(BUCKETS)) - set(filled):
            assert f"opd_by_position/kl_b{b:02d}" not in r  # no tokens past the horizon: no value, not a NaN
        # token-weighted bucket means give back the step's mean log-ratio (1e-6: float64 sums, float32 logging)
        mean = (
            sum(
                r[f"opd_by_position/log_ratio_b{b:02d}"] * r[f"opd_by_position/tokens_b{b:02d}"]
                for b in filled
            )
            / r["train/tokens"]
        )
        assert mean == pytest.approx(r["train/log_ratio_mean"], rel=1e-6, abs=1e-6)
    evals = [r for r in rows if any(k.startswith("eval/") and "/avg@2" in k for k in r)]
    assert [r["step"] for r in evals] == [0, 2, 4]


def test_plot_run_draws_accuracy_horizon_and_kl_by_position_from_a_real_run(popd_run, tmp_path):
    tool = _plot_tool()
    rows = tool.read_metrics(str(popd_run))
    curves = tool.position_curves(rows, "kl")
    assert len(curves) == 3 and all(len(ys) == BUCKETS for _, ys in curves)
    assert all(y == y for y in curves[-1][1])  # the last third of the run distils every bucket
    assert tool.training_seconds(rows)[-1] > 0
    written = tool.plot_runs([str(popd_run)], str(tmp_path / "plots"))
    assert sorted(os.path.basename(p) for p in written) == [
        "accuracy.png",
        "horizon.png",
        "kl_by_position.png",
    ]
    assert all(os.path.getsize(p) > 1000 for p in written)
