"""Whole OPD runs with the teacher inside the trainer (``--teacher.backend megatron``) on the tiny pair.

- One process: the first step (identical weights and rollouts, the same seeds) gives the same loss, log-ratio and
  top-K KL as the run with the embedded teacher, whose scores travel in the batch; the paper's student top-K ids
  are then found inside the fused loss instead of by the rollout engine. Tolerance rel 1e-4: the two teachers
  are different implementations of one network (fp32; see tests/distributed/test_teacher_megatron.py).
- With the exact full-vocabulary KL (``--loss.full_kl_coef``) the run reports it and it is positive.
- ``--loss.fp8_lm_head true`` reaches the two-model loss: the same first step, different later steps.
- ``--train.share_prompts true`` (each prompt's 2 rollouts packed in one row, the prompt computed once by the
  student and the teacher) gives the unpacked run's steps: the first to rel 1e-5 (fp32 rounding of other matmul
  shapes), the later ones to rel 2e-2 (Adam amplifies that rounding, as below).
- TP=2 x PP=2 (4 gloo ranks, the student's layout for both models) with shared prompts equals one unpacked
  process: the first step's loss to rel 1e-4 (sharded reductions change the summation order), later steps to
  rel 2e-2 (Adam amplifies the first step's rounding, as in tests/e2e/test_train_loop.py), and every rank
  reports the same metrics.
"""

from pathlib import Path

import pytest

from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.e2e

T_MAX = 16


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from megatron_opd.rollout.tiny_model import make_tiny_pair

    return Path(make_tiny_pair(str(tmp_path_factory.mktemp("pair"))))


def _argv(d, *extra):
    return [
        "--model.hf_path", str(d / "student"),
        "--teacher.hf_path", str(d / "teacher"),
        "--train.data_path", str(d / "data.jsonl"),
        "--train.apply_chat_template", "false",
        "--global-batch-size", "4",
        "--n-samples-per-prompt", "2",
        "--micro-batch-size", "2",
        "--rollout.max_response_length", str(T_MAX),
        "--horizon.schedule", "progressive", "--horizon.h0", "4", "--horizon.delta_h", "5",
        "--lr", "1e-3",
        "--teacher.topk", "4",
        "--loss.topk_kl_coef", "0.5",
        "--logging.progress_bar", "false",
        "--train.train_steps", "3",
        *extra,
    ]  # fmt: skip


FULL_KL = ("--teacher.backend", "megatron", "--loss.full_kl_coef", "0.5", "--loss.impl", "chunked")


def _single_worker(rank, world, d):
    from megatron_opd.training.main import train

    return {
        "embedded": train(_argv(d, "--loss.impl", "reference"))["steps"],
        "megatron": train(_argv(d, "--teacher.backend", "megatron", "--loss.impl", "reference"))["steps"],
        "full_kl": train(_argv(d, *FULL_KL))["steps"],
        "fp8": train(_argv(d, *FULL_KL, "--loss.fp8_lm_head", "true"))["steps"],
        "shared": train(_argv(d, *FULL_KL, "--train.share_prompts", "true"))["steps"],
    }


def _layout_worker(rank, world, d):
    from megatron_opd.training.main import train

    argv = _argv(
        d,
        *FULL_KL,
        "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "2",
        "--train.share_prompts", "true",
    )  # fmt: skip
    return train(argv)["steps"]


@pytest.fixture(scope="module")
def single(tiny_pair):
    return run_on_ranks(_single_worker, 1, tiny_pair)[0]


def test_megatron_teacher_first_step_equals_the_embedded_teacher(single):
    emb, meg = single["embedded"][0], single["megatron"][0]
    assert emb["train/tokens"] == meg["train/tokens"]
    for key in ("train/loss", "train/log_ratio_mean", "train/topk_kl_mean"):
        assert meg[key] == pytest.approx(emb[key], rel=1e-4, abs=1e-5), key
    assert abs(emb["train/log_ratio_mean"]) > 0.1  # the two models differ: r_t is not trivially 0
    assert all(s["train/loss"] == s["train/loss"] for s in single["megatron"])  # finite


def test_full_vocabulary_kl_is_reported_and_positive(single):
    steps = single["full_kl"]
    assert len(steps) == 3
    assert all(s["train/full_kl_mean"] > 0 for s in steps)
    assert "train/full_kl_mean" not in single["megatron"][0]


def test_fp8_lm_head_reaches_the_two_model_loss(single):
    """``loss.fp8_lm_head`` with the Megatron teacher: the first step's forward is the fp32 one (FP8 only in the
    student's gradient GEMMs), and the FP8 gradients then move the weights elsewhere (later steps differ)."""
    fp8, ref = single["fp8"], single["full_kl"]
    for key in ("train/loss", "train/full_kl_mean", "train/log_ratio_mean"):
        assert fp8[0][key] == pytest.approx(ref[0][key], rel=1e-6, abs=1e-7), key
    assert fp8[1]["train/loss"] != ref[1]["train/loss"]  # CPU runs are deterministic: only FP8 can change it
    assert all(s["train/loss"] == s["train/loss"] for s in fp8)  # finite


def test_shared_prompts_give_the_unpacked_steps(single):
    shared, ref = single["shared"], single["full_kl"]
    assert shared[0]["train/tokens"] == ref[0]["train/tokens"]
    for key in ("train/loss", "train/full_kl_mean", "train/log_ratio_mean"):
        assert shared[0][key] == pytest.approx(ref[0][key], rel=1e-5, abs=1e-6), key
    for later in range(1, 3):
        assert shared[later]["train/loss"] == pytest.approx(ref[later]["train/loss"], rel=2e-2, abs=1e-3)


def test_tp2_pp2_shared_prompts_with_the_megatron_teacher_match_one_process(tiny_pair, single):
    results = run_on_ranks(_layout_worker, 4, tiny_pair)
    ref = single["full_kl"]
    steps = results[0]
    assert steps[0]["train/tokens"] == ref[0]["train/tokens"]
    for key in ("train/loss", "train/full_kl_mean", "train/log_ratio_mean"):
        assert steps[0][key] == pytest.approx(ref[0][key], rel=1e-4, abs=1e-5), key
    for later in range(1, 3):
        assert steps[later]["train/loss"] == pytest.approx(ref[later]["train/loss"], rel=2e-2, abs=1e-3)
    for r in results[1:]:
        assert r[-1]["train/loss"] == pytest.approx(steps[-1]["train/loss"], rel=1e-6)
