"""A NaN/inf gradient with a finite loss (issue 9): the step is skipped on its gradient check, weights, Adam state
and LR schedule stay as they were, and the next good step trains normally. (A NaN loss is
tests/unit/test_step.py::test_non_finite_loss_skips_the_update; a whole run with NaN steps is
tests/e2e/test_reliability_nan_run.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.config.tree import LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_opd.model.builders import build_model_chunks
from megatron_opd.parallel.state import initialize_parallel
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.optimizer import setup_training
from megatron_opd.training.step import TrainStep

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")


def _batch(seed: int) -> OPDBatch:
    g = torch.Generator().manual_seed(seed)
    resps = torch.randint(0, 64, (4, 6), generator=g).tolist()
    return OPDBatch.from_lists([[1, 2, 3]] * 4, resps, [[-1.5] * 6] * 4, HorizonWindow(0, 6, 6))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_gradient_with_finite_loss_skips_the_update(poison):
    initialize_parallel(ParallelConfig(), seed=3)
    chunks = build_model_chunks(ModelConfig(vocab_size=64, num_layers=1, hidden_size=32, ffn_hidden_size=64,
                                            make_vocab_size_divisible_by=64))  # fmt: skip
    objs = setup_training(chunks, OptimizerConfig(lr=1e-3, lr_warmup_steps=2), total_steps=5)
    step = TrainStep(objs.model, objs.optimizer, objs.scheduler, LossConfig(impl="reference"), vocab_size=64)
    param = next(p for n, p in chunks[0].named_parameters() if "linear_fc1.weight" in n)
    handle = param.register_hook(lambda g: g * poison)  # only this gradient goes bad; the loss stays finite
    before = {k: v.detach().clone() for k, v in chunks[0].named_parameters()}
    num_steps = objs.scheduler.num_steps
    r = step([_batch(0)])
    assert r.skipped and r.skip_reason == "non-finite gradient"
    assert math.isfinite(r.scalars()["train/loss"])  # the loss was fine: the gradient check caught it
    assert (
        objs.scheduler.num_steps == num_steps and len(objs.optimizer.optimizer.state) == 0
    )  # no Adam moments
    for k, v in chunks[0].named_parameters():
        assert torch.equal(before[k], v), k
    handle.remove()
    r = step([_batch(0)])
    assert not r.skipped and r.lr == pytest.approx(1e-3 / 2)
    assert not torch.equal(before[next(iter(before))], next(chunks[0].parameters()))
