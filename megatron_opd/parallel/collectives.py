"""The device a collective's tensor must live on for a given process group.

Why it exists: NCCL only moves CUDA tensors and gloo only CPU ones (for most ops), so a flag or count that is
all-reduced on a CPU tensor works in every CPU test and crashes the first time it runs under NCCL (issue 14: the
checkpoint save's all-reduce). Every module that builds a tensor for a collective asks this one function instead
of guessing from ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Backends that accept CPU tensors. A group created with a multi-device backend string
# ("cpu:gloo,cuda:nccl") lists one per device type; CPU tensors go to its CPU backend.
_CPU_BACKENDS = frozenset({"gloo", "mpi"})


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device for tensors of collectives on ``group`` (None: the default group).

    CPU when the group's backend (or one of its per-device backends) takes CPU tensors, else this process's
    current CUDA device (NCCL). Raises ``RuntimeError`` for a CUDA-only backend without CUDA.
    """
    backend = str(dist.get_backend(group)).lower()
    # "nccl" or "cpu:gloo,cuda:nccl": the names after an optional "<device>:" prefix.
    names = {part.split(":")[-1].strip() for part in backend.split(",")}
    if names & _CPU_BACKENDS:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the process group's backend is {backend!r}, which needs CUDA tensors, but CUDA is not available; "
            "use parallel.distributed_backend=gloo on a machine without GPUs"
        )
    return torch.device("cuda", torch.cuda.current_device())
