"""``collective_device``: CPU tensors for gloo, the current CUDA device for NCCL (issue 14: the checkpoint's
all-reduce on a CPU tensor would crash under NCCL). The device of every collective of a real save and load is
checked on 2 gloo ranks in ``tests/distributed/test_checkpoint_collectives.py``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_opd.config.tree import ParallelConfig
from megatron_opd.parallel.collectives import collective_device
from megatron_opd.parallel.state import initialize_parallel

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")


def test_gloo_groups_get_cpu() -> None:
    initialize_parallel(ParallelConfig(distributed_backend="gloo"), seed=1)
    from megatron.core import parallel_state as mpu

    assert collective_device() == torch.device("cpu")
    assert collective_device(mpu.get_data_parallel_group()) == torch.device("cpu")


def test_nccl_gets_the_current_cuda_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in [
        ("nccl", torch.device("cuda", 3)),
        ("cuda:nccl", torch.device("cuda", 3)),
        ("cpu:gloo,cuda:nccl", torch.device("cpu")),  # CPU tensors go to the group's gloo part
        ("gloo", torch.device("cpu")),
    ]:
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collective_device() == want, backend
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*distributed_backend=gloo"):
        collective_device()
