"""Checkpoint bookkeeping in one process: atomic directories and the latest marker, keep-last-N, plain-types
trainer state, optimizer-state rules, exact resume of weights, Adam state, LR schedule and RNG."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.config.tree import LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_opd.model.builders import build_model_chunks
from megatron_opd.parallel.state import initialize_parallel
from megatron_opd.training import checkpoint as ckpt
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.optimizer import setup_training
from megatron_opd.training.step import TrainStep

MODEL = ModelConfig(
    vocab_size=64, num_layers=1, hidden_size=32, ffn_hidden_size=64, make_vocab_size_divisible_by=64
)


@pytest.fixture(autouse=True, scope="module")
def _own_process_group():
    """This module may start a one-process group in the pytest process: leave none behind for other modules."""
    import torch.distributed as dist

    from megatron_opd.parallel.state import destroy_parallel

    started_here = not dist.is_initialized()
    yield
    if started_here:
        destroy_parallel()


def _setup(seed: int, distopt: bool = False):
    initialize_parallel(ParallelConfig(), seed=seed)
    chunks = build_model_chunks(MODEL)
    opt = OptimizerConfig(lr=1e-2, lr_warmup_steps=3, use_distributed_optimizer=distopt)
    objs = setup_training(chunks, opt, total_steps=10)
    step = TrainStep(objs.model, objs.optimizer, objs.scheduler, LossConfig(), vocab_size=64)
    return chunks, objs, step


def _batch(seed: int) -> OPDBatch:
    g = torch.Generator().manual_seed(seed)
    resps = torch.randint(0, 64, (4, 5), generator=g).tolist()
    return OPDBatch.from_lists([[1, 2]] * 4, resps, [[-1.0] * 5] * 4, HorizonWindow(0, 5, 5))


def test_latest_marker_ignores_incomplete_and_falls_back(tmp_path) -> None:
    root = str(tmp_path)
    assert ckpt.latest_iteration(root) is None
    os.makedirs(ckpt.iteration_dir(root, 3))
    os.makedirs(ckpt.iteration_dir(root, 9) + ".tmp")  # an interrupted save: never the latest
    assert ckpt.latest_iteration(root) == 3  # no marker: newest complete directory
    (tmp_path / ckpt.LATEST_FILE).write_text("9")  # marker naming an incomplete checkpoint is not trusted
    assert ckpt.latest_iteration(root) == 3
    os.makedirs(ckpt.iteration_dir(root, 5))
    (tmp_path / ckpt.LATEST_FILE).write_text("3")
    assert ckpt.latest_iteration(root) == 3  # the marker wins when it names a complete checkpoint


def test_save_resume_exact_and_bookkeeping(tmp_path) -> None:
    root = str(tmp_path / "run")
    chunks, objs, step = _setup(seed=1)
    with pytest.raises(ckpt.CheckpointError, match="weights_only"):
        ckpt.save_checkpoint(root, 0, objs.model, objs.optimizer, objs.scheduler, {"bad": object()})
    assert ckpt.latest_iteration(root) is None
    # Saved before the first step: the optimizer is 'fresh', and resuming into a fresh optimizer is exact.
    ckpt.save_checkpoint(root, 0, objs.model, objs.optimizer, objs.scheduler, {"step": 0}, keep_last=2)
    for k in range(2):
        step([_batch(k)])
    torch.manual_seed(123)  # RNG state at save time must come back on resume
    os.makedirs(ckpt.iteration_dir(root, 2) + ".tmp")  # leftover of a crashed save: cleaned by the next save
    ckpt.save_checkpoint(
        root, 2, objs.model, objs.optimizer, objs.scheduler, {"step": 2, "order": [3, 1]}, keep_last=2
    )
    expected_rand = torch.rand(3)
    expected = [step([_batch(k)]) for k in range(2, 4)]
    ckpt.save_checkpoint(root, 4, objs.model, objs.optimizer, objs.scheduler, {"step": 4}, keep_last=2)
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000004", ckpt.LATEST_FILE]  # kept the last 2
    assert (tmp_path / "run" / ckpt.LATEST_FILE).read_text() == "4"

    chunks, objs, step = _setup(seed=2)
    state = ckpt.load_checkpoint(root, objs.model, objs.optimizer, objs.scheduler, iteration=2)
    assert state["trainer"] == {"step": 2, "order": [3, 1]} and state["iteration"] == 2
    torch.testing.assert_close(torch.rand(3), expected_rand, rtol=0, atol=0)
    got = [step([_batch(k)]) for k in range(2, 4)]
    assert [r.loss for r in got] == [r.loss for r in expected]  # same layout: bit-identical replay
    assert [r.lr for r in got] == [r.lr for r in expected]  # the LR schedule resumed mid-warmup
    assert got[0].lr == pytest.approx(1e-2)


def test_weights_only_checkpoint_refuses_silent_optimizer_reset(tmp_path) -> None:
    root = str(tmp_path)
    chunks, objs, step = _setup(seed=1)
    step([_batch(0)])
    ckpt.save_checkpoint(root, 1, objs.model, None, None, {"step": 1})
    chunks2, objs2, _ = _setup(seed=2)
    with pytest.raises(ckpt.CheckpointError, match="no optimizer state"):
        ckpt.load_checkpoint(root, objs2.model, objs2.optimizer, objs2.scheduler)
    ckpt.load_checkpoint(root, objs2.model, objs2.optimizer, objs2.scheduler, load_optimizer=False)
    for (n, a), (_, b) in zip(chunks[0].named_parameters(), chunks2[0].named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_optimizer_kind_mismatch_is_refused(tmp_path) -> None:
    root = str(tmp_path)
    _, objs, step = _setup(seed=1)
    step([_batch(0)])
    ckpt.save_checkpoint(root, 1, objs.model, objs.optimizer, objs.scheduler, {"step": 1})
    _, objs2, _ = _setup(seed=2, distopt=True)
    with pytest.raises(ckpt.CheckpointError, match="use_distributed_optimizer=false"):
        ckpt.load_checkpoint(root, objs2.model, objs2.optimizer, objs2.scheduler)
