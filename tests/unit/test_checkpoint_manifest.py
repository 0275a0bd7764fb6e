"""A damaged newest checkpoint is detected before it is read, and resume falls back (issue 16, item 3).

Two checkpoints are saved (iterations 2 and 4, with different weights). Each of the files named in the issue is
truncated in the newest in turn, or one byte of it is flipped (same size: only the checksum can see it); resume must
then load iteration 2, warn naming the damaged file, and give iteration 2's weights. With the older checkpoint gone
the error must name the damaged file. A checkpoint without a manifest (saved before manifests existed) loads with a
warning.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.config.tree import LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_opd.model.builders import build_model_chunks
from megatron_opd.parallel.state import initialize_parallel
from megatron_opd.training import checkpoint as ckpt
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.checkpoint_manifest import MANIFEST_FILE, file_crc32, verify_checkpoint
from megatron_opd.training.optimizer import setup_training
from megatron_opd.training.step import TrainStep

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")

MODEL = ModelConfig(
    vocab_size=64, num_layers=1, hidden_size=32, ffn_hidden_size=64, make_vocab_size_divisible_by=64
)
DAMAGED = ["dist/__0_0.distcp", "dist/common.pt", ckpt.TRAINER_STATE_FILE, "dist/.metadata"]


def _setup():
    initialize_parallel(ParallelConfig(), seed=1)
    chunks = build_model_chunks(MODEL)
    objs = setup_training(chunks, OptimizerConfig(lr=1e-2, lr_warmup_steps=1), total_steps=8)
    return (
        chunks,
        objs,
        TrainStep(objs.model, objs.optimizer, objs.scheduler, LossConfig(impl="reference"), vocab_size=64),
    )


def _params(chunks) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in chunks[0].named_parameters()}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A save directory with iterations 2 and 4, and the weights each holds."""
    root = str(tmp_path_factory.mktemp("two") / "run")
    chunks, objs, step = _setup()
    weights = {}
    for it in (2, 4):
        g = torch.Generator().manual_seed(it)
        resps = torch.randint(0, 64, (4, 5), generator=g).tolist()
        step([OPDBatch.from_lists([[1, 2]] * 4, resps, [[-1.0] * 5] * 4, HorizonWindow(0, 5, 5))])
        ckpt.save_checkpoint(root, it, objs.model, objs.optimizer, objs.scheduler, {"step": it})
        weights[it] = _params(chunks)
    return root, weights


def _damage(path: str, how: str) -> None:
    data = open(path, "rb").read()
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # flip one byte in the middle: same size
        i = len(data) // 2
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    with open(path, "wb") as f:
        f.write(data)


def test_manifest_lists_every_file_and_an_intact_checkpoint_verifies(two_checkpoints):
    root, _ = two_checkpoints
    it_dir = ckpt.iteration_dir(root, 4)
    import json

    files = json.load(open(os.path.join(it_dir, MANIFEST_FILE)))["files"]
    on_disk = sorted(
        os.path.relpath(os.path.join(d, f), it_dir)
        for d, _, fs in os.walk(it_dir)
        for f in fs
        if f != MANIFEST_FILE
    )
    assert sorted(files) == on_disk and set(DAMAGED) <= set(files)
    for name in on_disk:
        assert files[name]["crc32"] == file_crc32(os.path.join(it_dir, name))
    assert verify_checkpoint(it_dir) == []


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(
    two_checkpoints, name, how, tmp_path, caplog
):
    pristine, weights = two_checkpoints
    root = str(tmp_path / "run")
    shutil.copytree(pristine, root)
    _damage(os.path.join(ckpt.iteration_dir(root, 4), name), how)
    chunks, objs, _ = _setup()
    with caplog.at_level(logging.WARNING, logger="megatron_opd.training.checkpoint"):
        state = ckpt.load_checkpoint(root, objs.model, objs.optimizer, objs.scheduler)
    assert state["iteration"] == 2 and state["trainer"] == {"step": 2}
    for n, p in _params(chunks).items():
        torch.testing.assert_close(p, weights[2][n], rtol=0, atol=0, msg=n)  # iteration 2's weights, exactly
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    reason = "truncated" if how == "truncate" else "checksum"
    assert (
        "skipped damaged" in warning and os.path.join("iter_0000004", name) in warning and reason in warning
    )

    # Only the damaged checkpoint left: an error naming the file, not a bare EOFError.
    shutil.rmtree(ckpt.iteration_dir(root, 2))
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint") as err:
        ckpt.load_checkpoint(root, objs.model, objs.optimizer, objs.scheduler)
    assert os.path.join("iter_0000004", name) in str(err.value)


def test_missing_file_and_unreadable_manifest_are_named(two_checkpoints, tmp_path):
    pristine, _ = two_checkpoints
    root = str(tmp_path / "run")
    shutil.copytree(pristine, root)
    it_dir = ckpt.iteration_dir(root, 4)
    os.remove(os.path.join(it_dir, "rng", "rank00000.pt"))
    assert verify_checkpoint(it_dir) == [f"{os.path.join(it_dir, 'rng', 'rank00000.pt')}: missing"]
    with open(os.path.join(it_dir, MANIFEST_FILE), "w") as f:
        f.write('{"format": 1, "files": {')  # cut short
    (problem,) = verify_checkpoint(it_dir)
    assert MANIFEST_FILE in problem and "unreadable" in problem


def test_checkpoint_without_manifest_loads_with_a_warning(two_checkpoints, tmp_path, caplog):
    pristine, weights = two_checkpoints
    root = str(tmp_path / "run")
    shutil.copytree(pristine, root)
    os.remove(os.path.join(ckpt.iteration_dir(root, 4), MANIFEST_FILE))  # as saved by an older version
    chunks, objs, _ = _setup()
    with caplog.at_level(logging.WARNING, logger="megatron_opd.training.checkpoint"):
        assert ckpt.load_checkpoint(root, objs.model, objs.optimizer, objs.scheduler)["iteration"] == 4
    assert any("no manifest" in r.getMessage() for r in caplog.records)
    for n, p in _params(chunks).items():
        torch.testing.assert_close(p, weights[4][n], rtol=0, atol=0, msg=n)


def test_explicit_iteration_does_not_fall_back(two_checkpoints, tmp_path):
    pristine, _ = two_checkpoints
    root = str(tmp_path / "run")
    shutil.copytree(pristine, root)
    _damage(os.path.join(ckpt.iteration_dir(root, 4), "dist", "common.pt"), "truncate")
    _, objs, _ = _setup()
    with pytest.raises(ckpt.CheckpointError, match=r"for iteration 4: .*common\.pt"):
        ckpt.load_checkpoint(root, objs.model, objs.optimizer, objs.scheduler, iteration=4)
