"""Every collective of a checkpoint save and load runs on the device its group's backend needs (issue 14).

On 2 gloo ranks (DP=2, the distributed optimizer, so the optimizer's DP all-reduce, the manifest's broadcast and
gathers and the has-state all-reduce all run), every tensor collective is wrapped to record its tensor's device
and the module of the project that called it, and ``collective_device`` is wrapped in each checkpoint module to
record that it was asked. Every tensor must be on ``collective_device(group)`` of its group (CPU under gloo), and
each module must have asked the helper (a tensor made on a hard-coded device would not). That the helper answers
the CUDA device under NCCL is ``tests/unit/test_parallel_collectives.py``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

_OPS = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "gather",
    "reduce",
)
_MODULES = (
    "megatron_opd.training.checkpoint",
    "megatron_opd.training.checkpoint_manifest",
    "megatron_opd.training.distopt_checkpoint",
)


def _project_caller() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("megatron_opd."):
            return name
        frame = frame.f_back
    return None


def _worker(rank: int, world: int, root: str) -> dict:
    import importlib

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from megatron_opd.algorithms.horizon import HorizonWindow
    from megatron_opd.config.tree import LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
    from megatron_opd.model.builders import build_model_chunks
    from megatron_opd.parallel import collectives
    from megatron_opd.parallel.state import initialize_parallel
    from megatron_opd.training import checkpoint as ckpt
    from megatron_opd.training.batch import OPDBatch
    from megatron_opd.training.optimizer import setup_training
    from megatron_opd.training.step import TrainStep

    initialize_parallel(ParallelConfig(), seed=1)
    model = ModelConfig(
        vocab_size=64, num_layers=1, hidden_size=32, ffn_hidden_size=64, make_vocab_size_divisible_by=64
    )
    objs = setup_training(
        build_model_chunks(model), OptimizerConfig(lr=1e-2, use_distributed_optimizer=True), total_steps=4
    )
    step = TrainStep(objs.model, objs.optimizer, objs.scheduler, LossConfig(impl="reference"), vocab_size=64)
    resps = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(0)).tolist()
    step(
        [
            OPDBatch.from_lists([[1, 2]] * 4, resps, [[-1.0] * 5] * 4, HorizonWindow(0, 5, 5)).shard(
                rank, world
            )
        ]
    )

    calls: list[dict] = []
    asked: list[str] = []
    originals = {}
    for op in _OPS:
        real = getattr(c10d, op)
        originals[op] = real

        def wrapped(tensor, *a, _op=op, _real=real, **k):
            group = k.get("group")
            first = tensor[0] if isinstance(tensor, list) else tensor
            calls.append(
                {
                    "op": _op,
                    "device": str(first.device),
                    "want": str(collectives.collective_device(group)),
                    "caller": _project_caller(),
                }
            )
            return _real(tensor, *a, **k)

        setattr(c10d, op, wrapped)
        setattr(dist, op, wrapped)
    for name in _MODULES:
        module = importlib.import_module(name)

        def spy(group=None, _name=name):
            asked.append(_name)
            return collectives.collective_device(group)

        module.collective_device = spy
    ckpt.save_checkpoint(root, 1, objs.model, objs.optimizer, objs.scheduler, {"step": 1})
    ckpt.load_checkpoint(root, objs.model, objs.optimizer, objs.scheduler)
    return {"calls": calls, "asked": asked}


def test_every_checkpoint_collective_uses_its_groups_device(tmp_path) -> None:
    results = run_on_ranks(_worker, 2, os.path.join(str(tmp_path), "run"))
    for rank, out in enumerate(results):
        ours = [c for c in out["calls"] if c["caller"] in _MODULES]
        assert {c["caller"] for c in ours} == set(_MODULES), (rank, ours)  # each module ran a collective
        for c in out["calls"]:  # ours and Megatron's/DCP's alike
            assert c["device"] == c["want"] == "cpu", (rank, c)
        assert set(out["asked"]) == set(_MODULES), (rank, out["asked"])
