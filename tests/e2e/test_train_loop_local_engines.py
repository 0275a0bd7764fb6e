"""rollout.engine_ranks 'data_parallel': every data-parallel replica generates its own share with its own engine.

With greedy rollouts the samples do not depend on the random stream, so a run whose replicas generate their own
shares must train exactly as the controller path (rank 0 generates everything and hands the shares over): same
losses, same rollout statistics, at DP=2 x TP=2 (the share goes down a TP group) and DP=2 x PP=2 (the share goes
down a pipeline group, and each replica's engine receives the later stage's weights from its own pipeline).
"""

import pytest

from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from pathlib import Path

    from megatron_opd.rollout.tiny_model import make_tiny_pair

    return Path(make_tiny_pair(str(tmp_path_factory.mktemp("pair"))))


def _argv(d, layout, engine_ranks, steps_per_rollout=1):
    return [
        "--train.steps_per_rollout", str(steps_per_rollout),
        "--model.hf_path", str(d / "student"),
        "--teacher.hf_path", str(d / "teacher"),
        "--train.data_path", str(d / "data.jsonl"),
        "--train.apply_chat_template", "false",
        "--global-batch-size", "4",
        "--n-samples-per-prompt", "2",
        "--micro-batch-size", "2",
        "--rollout.max_response_length", "12",
        "--rollout.temperature", "0",
        "--rollout.engine_ranks", engine_ranks,
        "--horizon.h0", "4", "--horizon.delta_h", "4", "--horizon.delta_k", "1",
        "--lr", "1e-3",
        "--teacher.topk", "4",
        "--loss.topk_kl_coef", "0.5",
        "--loss.impl", "reference",
        "--logging.progress_bar", "false",
        "--train.train_steps", "3",
        *layout,
    ]  # fmt: skip


def _worker(rank, world, d, layout, k):
    from megatron_opd.config import parse_config
    from megatron_opd.training import run as R
    from megatron_opd.training.main import train

    out = {mode: train(_argv(d, layout, mode, k))["steps"] for mode in ("controller", "data_parallel")}
    run = R.setup_run(parse_config(_argv(d, layout, "data_parallel", k)))
    out["has_engine"] = run.engine is not None
    R.close(run)
    return out


@pytest.mark.parametrize(
    "layout, leaders, k",
    [
        (["--tensor-model-parallel-size", "2"], {0: 0, 1: 2}, 1),
        (["--pipeline-model-parallel-size", "2"], {0: 0, 1: 1}, 1),
        # two steps per rollout phase: each replica generates its share of both steps' prompts at once
        (["--tensor-model-parallel-size", "2"], {0: 0, 1: 2}, 2),
    ],
    ids=["dp2_tp2", "dp2_pp2", "dp2_tp2_two_steps_per_rollout"],
)
def test_replicas_generating_their_own_shares_train_as_the_controller_path(tiny_pair, layout, leaders, k):
    results = run_on_ranks(_worker, 4, tiny_pair, layout, k)
    ref, local = results[0]["controller"], results[0]["data_parallel"]
    assert len(ref) == len(local) == 3
    for a, b in zip(ref, local):
        # identical rollouts (greedy) and weights: the same reductions in the same order
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6, abs=1e-7)
        assert b["train/tokens"] == a["train/tokens"]
        for key in ("rollout/response_length_mean", "rollout/response_length_max", "rollout/truncation_rate"):
            assert b[key] == a[key], key
    # one engine per replica, on its leader (Megatron's rank order: TP innermost, then DP, then PP)
    assert [r["has_engine"] for r in results] == [r in leaders.values() for r in range(4)]
    for r in results[1:]:  # every rank reports the same step
        assert r["data_parallel"][-1]["train/loss"] == pytest.approx(local[-1]["train/loss"], rel=1e-6)
