"""Checkpoint bookkeeping in one process: atomic directories and the latest marker, keep-last-N, plain-types
trainer state, optimizer-state rules, exact resume of weights, Adam state, LR schedule and RNG; a full disk during
a save (issue 16, item 9) and the resume rules for ``checkpoint.load`` (item 4)."""

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

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")

MODEL = ModelConfig(
    vocab_size=64, num_layers=1, hidden_size=32, ffn_hidden_size=64, make_vocab_size_divisible_by=64
)


def _setup(seed: int, distopt: bool = False):
    initialize_parallel(ParallelConfig(), seed=seed)
    chunks = build_model_chunks(MODEL)
    opt = OptimizerConfig(lr=1e-2, lr_warmup_steps=3, use_distributed_optimizer=distopt)
    objs = setup_training(chunks, opt, total_steps=10)
    step = TrainStep(objs.model, objs.optimizer, objs.scheduler, LossConfig(impl="reference"), vocab_size=64)
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


def _disk_full_in_rng_save(monkeypatch) -> None:
    real = torch.save

    def save(obj, f, *a, **k):
        if isinstance(f, str) and f.endswith("rank00000.pt"):
            # What torch.save's zip writer raises when a write fails for want of space (issue 16).
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 0")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def _disk_full_in_dcp_write(monkeypatch) -> None:
    import errno

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def write_item(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", write_item)


def _disk_full_in_manifest(monkeypatch) -> None:
    import errno

    from megatron_opd.training import checkpoint_manifest

    def crc(path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoint_manifest, "file_crc32", crc)


@pytest.mark.parametrize(
    "inject",
    [_disk_full_in_rng_save, _disk_full_in_dcp_write, _disk_full_in_manifest],
    ids=["rng", "dcp", "manifest"],
)
def test_disk_full_during_save_says_so_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, inject
) -> None:
    from megatron_opd.training.checkpoint_manifest import verify_checkpoint

    root = str(tmp_path / "run")
    chunks, objs, step = _setup(seed=1)
    step([_batch(0)])
    ckpt.save_checkpoint(root, 1, objs.model, objs.optimizer, objs.scheduler, {"step": 1})
    saved = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    step([_batch(1)])
    with monkeypatch.context() as m:
        inject(m)
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.save_checkpoint(root, 2, objs.model, objs.optimizer, objs.scheduler, {"step": 2})
    msg = str(err.value)
    assert msg.startswith("the disk is full") and ckpt.iteration_dir(root, 2) + ".tmp" in msg, msg
    assert "bytes free" in msg and f"{ckpt.iteration_dir(root, 1)} is intact" in msg, msg
    assert sorted(os.listdir(root)) == ["iter_0000001", ckpt.LATEST_FILE]  # the partial save is gone
    assert ckpt.latest_iteration(root) == 1 and verify_checkpoint(ckpt.iteration_dir(root, 1)) == []
    chunks2, objs2, _ = _setup(seed=2)
    assert ckpt.load_checkpoint(root, objs2.model, objs2.optimizer, objs2.scheduler)["iteration"] == 1
    for n, p in chunks2[0].named_parameters():
        torch.testing.assert_close(p, saved[n], rtol=0, atol=0, msg=n)
    # The run can go on saving once space is back.
    ckpt.save_checkpoint(root, 2, objs.model, objs.optimizer, objs.scheduler, {"step": 2})
    assert ckpt.latest_iteration(root) == 2


def test_other_save_errors_are_not_called_disk_full(tmp_path, monkeypatch) -> None:
    _, objs, _ = _setup(seed=1)

    real = torch.save

    def save(obj, f, *a, **k):
        if isinstance(f, str) and f.endswith("rank00000.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:123] some other failure")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RuntimeError, match="some other failure") as err:
        ckpt.save_checkpoint(str(tmp_path), 1, objs.model, None, None, {"step": 1})
    assert not isinstance(err.value, ckpt.CheckpointError)  # passed through unchanged, with its traceback


def test_load_path_must_exist_and_an_empty_one_must_be_asked_for(tmp_path) -> None:
    from types import SimpleNamespace

    from megatron_opd.config.base import ConfigError
    from megatron_opd.config.tree import CheckpointConfig, OPDConfig
    from megatron_opd.training.run import _resume

    _, objs, _ = _setup(seed=1)
    lines: list[str] = []

    def resume(**checkpoint) -> None:
        cfg = OPDConfig(checkpoint=CheckpointConfig(**checkpoint))
        _resume(SimpleNamespace(cfg=cfg, training=objs, logger=SimpleNamespace(text=lines.append)))

    typo = str(tmp_path / "rnu")
    with pytest.raises(ConfigError, match=r"config key 'checkpoint\.load': got '.*rnu'.*does not exist"):
        resume(load=typo)
    with pytest.raises(ConfigError, match=r"checkpoint\.load.*does not exist"):  # not even when asked: a typo
        resume(load=typo, allow_empty_load=True)
    empty = tmp_path / "run"
    empty.mkdir()
    os.makedirs(
        ckpt.iteration_dir(str(empty), 2) + ".tmp"
    )  # killed during its first save: still no checkpoint
    with pytest.raises(ConfigError, match=r"checkpoint\.load.*holds none.*checkpoint\.allow_empty_load=true"):
        resume(load=str(empty))
    assert lines == []
    resume(load=str(empty), allow_empty_load=True)
    assert lines == [f"no checkpoint under {empty}: starting from the initial weights"]
