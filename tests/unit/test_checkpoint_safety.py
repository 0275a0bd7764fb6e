"""Loading a checkpoint never runs code stored in it (issue 16, item 1).

Every kind of file a load opens is booby-trapped in turn with a pickle whose unpickling would run
``touch <marker>``: the DCP ``.metadata`` (plain pickle), ``common.pt`` (Megatron's common state, which also holds
the distributed optimizer's param groups), ``trainer_state.pt``, the per-rank RNG file, a byte item inside a
``.distcp`` file (Megatron's ShardedObjects, which DCP's own planner loads with ``weights_only=False``) and a
tensor item inside a ``.distcp`` file. The manifest is rewritten after each trap (an attacker can write it too),
so what is tested is the reading itself. Each load must fail with a ``CheckpointError`` naming the file, and the
marker must not exist. The same loader serves training resume, ``tools/eval.py --megatron-ckpt`` and
``tools/convert_megatron_to_hf.py``; the last two (which read tensors only) are checked on the trapped ``.metadata``, ``common.pt`` and tensor item.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil

import pytest
import torch

from megatron_opd.config.tree import (
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RolloutConfig,
)
from megatron_opd.model.builders import build_model_chunks
from megatron_opd.parallel.state import initialize_parallel
from megatron_opd.training import checkpoint as ckpt
from megatron_opd.training import checkpoint_safety as safety
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.checkpoint_manifest import write_manifest
from megatron_opd.training.optimizer import setup_training
from megatron_opd.training.step import TrainStep

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")

MODEL = ModelConfig(
    vocab_size=64, num_layers=1, hidden_size=32, ffn_hidden_size=64, make_vocab_size_divisible_by=64
)


class _Trap:
    """Unpickling this runs a shell command that creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _setup(distopt: bool):
    initialize_parallel(ParallelConfig(), seed=1)
    chunks = build_model_chunks(MODEL)
    objs = setup_training(
        chunks, OptimizerConfig(lr=1e-2, lr_warmup_steps=1, use_distributed_optimizer=distopt), total_steps=4
    )
    return objs, TrainStep(
        objs.model, objs.optimizer, objs.scheduler, LossConfig(impl="reference"), vocab_size=64
    )


@pytest.fixture(scope="module", params=[False, True], ids=["adam", "distopt"])
def saved(request, tmp_path_factory):
    """A pristine checkpoint (after one optimizer step, so Adam's state is in it) of each optimizer kind."""
    root = str(tmp_path_factory.mktemp("saved") / "run")
    objs, step = _setup(request.param)
    resps = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(0)).tolist()
    from megatron_opd.algorithms.horizon import HorizonWindow

    step([OPDBatch.from_lists([[1, 2]] * 4, resps, [[-1.0] * 5] * 4, HorizonWindow(0, 5, 5))])
    ckpt.save_checkpoint(root, 1, objs.model, objs.optimizer, objs.scheduler, {"step": 1})
    return request.param, root


def _copy(saved_root: str, tmp_path) -> tuple[str, str]:
    root = str(tmp_path / "run")
    shutil.copytree(saved_root, root)
    return root, ckpt.iteration_dir(root, 1)


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _point_item_at_trap(it_dir: str, marker: str, *, byte_item: bool) -> str:
    """Append a trapped payload to the .distcp file that holds one item (a ShardedObject's bytes, or a tensor) and
    point that item's storage entry at it, rewriting .metadata with DCP's own classes. Returns the file name."""
    md_path = os.path.join(it_dir, "dist", ".metadata")
    with open(md_path, "rb") as f:
        metadata = pickle.load(f)  # our own pristine file
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    want = BytesStorageMetadata if byte_item else TensorStorageMetadata
    fqn = next(
        k for k, v in metadata.state_dict_metadata.items() if isinstance(v, want) and k.startswith("decoder")
    )
    index = next(i for i in metadata.storage_data if i.fqn == fqn)
    info = metadata.storage_data[index]
    path = os.path.join(it_dir, "dist", info.relative_path)
    payload = _torch_bytes(_Trap(marker))
    offset = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    with open(md_path, "wb") as f:
        pickle.dump(metadata, f)
    return info.relative_path


def _trap(kind: str, it_dir: str, marker: str) -> str:
    """Booby-trap one file of the checkpoint; returns the name the error must contain."""
    trap = _Trap(marker)
    if kind == "metadata":
        md_path = os.path.join(it_dir, "dist", ".metadata")
        with open(md_path, "rb") as f:
            metadata = pickle.load(f)
        metadata.planner_data = trap  # a real metadata object carrying the payload
        with open(md_path, "wb") as f:
            pickle.dump(metadata, f)
        return ".metadata"
    if kind == "common":
        path = os.path.join(it_dir, "dist", "common.pt")
        common = torch.load(path, weights_only=True)
        common["trap"] = trap
        torch.save(common, path)
        return "common.pt"
    if kind == "trainer_state":
        path = os.path.join(it_dir, ckpt.TRAINER_STATE_FILE)
        state = torch.load(path, weights_only=True)
        state["trainer"]["trap"] = trap
        torch.save(state, path)
        return ckpt.TRAINER_STATE_FILE
    if kind == "rng":
        path = os.path.join(it_dir, "rng", "rank00000.pt")
        torch.save({"python": trap}, path)
        return "rank00000.pt"
    return _point_item_at_trap(it_dir, marker, byte_item=kind == "distcp_object")


KINDS = ["metadata", "common", "trainer_state", "rng", "distcp_object", "distcp_tensor"]


@pytest.mark.parametrize("kind", KINDS)
def test_booby_trapped_checkpoint_file_is_refused_unexecuted(saved, kind, tmp_path):
    distopt, pristine = saved
    root, it_dir = _copy(pristine, tmp_path)
    marker = tmp_path / "pwned"
    name = _trap(kind, it_dir, str(marker))
    write_manifest(it_dir)  # the attacker rewrites the manifest too: the reading itself must be safe
    objs, _ = _setup(distopt)
    with pytest.raises(safety.CheckpointError, match=name.replace(".", r"\.")) as err:
        ckpt.load_checkpoint(root, objs.model, objs.optimizer, objs.scheduler)
    assert "not executed" in str(err.value)
    assert not marker.exists(), f"unpickling {name} ran the payload"


def test_pristine_copy_loads(saved, tmp_path):
    """The control for the test above: the same copy without a trap loads (so the refusals are the traps)."""
    distopt, pristine = saved
    root, _ = _copy(pristine, tmp_path)
    objs, _ = _setup(distopt)
    assert ckpt.load_checkpoint(root, objs.model, objs.optimizer, objs.scheduler)["iteration"] == 1


def test_restricted_unpickler_refuses_any_other_global(tmp_path):
    path = tmp_path / ".metadata"
    for payload in (_Trap(str(tmp_path / "pwned")), {"f": print}, torch.nn.Linear(1, 1)):
        path.write_bytes(pickle.dumps(payload))
        with pytest.raises(safety.CheckpointError, match=r"\.metadata: .*refused to load global"):
            safety.read_dcp_metadata(path)
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(pickle.dumps({"just": [1, 2.0, "data"]}))  # no globals, but not metadata either
    with pytest.raises(safety.CheckpointError, match="not torch.distributed.checkpoint metadata"):
        safety.read_dcp_metadata(path)


@pytest.mark.parametrize("kind", ["metadata", "common", "distcp_tensor"])
def test_conversion_and_eval_refuse_a_booby_trapped_checkpoint(saved, kind, tmp_path):
    """``tools/convert_megatron_to_hf.py`` (``megatron_to_hf``) and ``tools/eval.py --megatron-ckpt``
    (``evaluate_checkpoint``) read through the same safe loader."""
    from megatron_opd.eval.checkpoint_eval import evaluate_checkpoint
    from megatron_opd.model.hf_conversion.driver import FORMAT, METADATA_NAME, megatron_to_hf

    _, pristine = saved
    _, it_dir = _copy(pristine, tmp_path)
    marker = tmp_path / "pwned"
    name = _trap(kind, it_dir, str(marker))
    dist_dir = os.path.join(it_dir, "dist")
    # The model description the conversion reads (as convert_hf_to_megatron.py stores it).
    meta = {"format": FORMAT, "architecture": MODEL.architecture, "model": dataclasses.asdict(MODEL)}
    with open(os.path.join(dist_dir, METADATA_NAME), "w") as f:
        json.dump(meta, f)
    pattern = name.replace(".", r"\.")
    with pytest.raises(safety.CheckpointError, match=pattern):
        megatron_to_hf(dist_dir, tmp_path / "hf", progress=False)
    with pytest.raises(safety.CheckpointError, match=pattern):
        evaluate_checkpoint(EvalConfig(), RolloutConfig(), megatron_ckpt=it_dir)
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()
