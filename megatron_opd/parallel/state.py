"""Start torch.distributed and Megatron's model-parallel groups from ``ParallelConfig``.

Why it exists: every entry point (training, tools, tests) needs the same start-up: the process group (NCCL with
CUDA, gloo without; ranks from torchrun's environment on one node or many, or a single process when launched
plainly), the CPU redirects when CUDA is absent, Megatron's TP/PP/VPP/CP/DP groups and the seeds. Doing it in
one function keeps layouts and seeding identical everywhere.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from megatron_opd.config.tree import ParallelConfig
from megatron_opd.parallel import cpu_compat
from megatron_opd.parallel.launch import LOOPBACK, bound_tcp_store, loopback_only_env

logger = logging.getLogger(__name__)

_env_set_here: list[str] = []  # the variables a single-process start set, removed again by destroy_parallel


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in the layout (all values after initialisation)."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    cp_size: int
    vpp_size: int | None
    backend: str
    device: torch.device


def _init_process_group(backend_choice: str, timeout_minutes: int) -> str:
    """Start torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) or as 1 process."""
    if dist.is_initialized():
        return dist.get_backend()
    backend = backend_choice
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError(
            "parallel.distributed_backend is 'nccl' but CUDA is not available; use 'gloo' or 'auto'"
        )
    global _env_set_here
    timeout = timedelta(minutes=timeout_minutes)
    store = None
    if "RANK" not in os.environ:  # a plain single-process launch
        # Its store listens on loopback only (TCPStore alone would listen on every interface), and so do gloo's
        # and NCCL's sockets.
        store = bound_tcp_store(LOOPBACK, 0, 1, timeout)
        single = dict(
            MASTER_ADDR=LOOPBACK, MASTER_PORT=str(store.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        os.environ.update(single)
        _env_set_here = [*single, *loopback_only_env(os.environ)]
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )
    return backend


def set_seeds(seed: int) -> None:
    """Megatron's seeding: the default generator gets ``seed + 100 * pp_rank`` (so pipeline stages differ, as in
    Megatron-LM), and the model-parallel RNG tracker its data/TP/expert states. With ``use_cpu_initialization``
    the weights are drawn whole and then split, so they do not depend on the TP size."""
    torch.manual_seed(seed + 100 * mpu.get_pipeline_model_parallel_rank())
    if cpu_compat.cpu_compat_active():
        cpu_compat.reset_cpu_rng_tracker()
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        torch.cuda.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def initialize_parallel(parallel_cfg: ParallelConfig, seed: int) -> ParallelInfo:
    """Start torch.distributed (if not yet started) and Megatron's parallel groups; seed every generator.

    Works under ``torchrun`` (one node or many: ranks and the rendezvous come from its environment) and in a
    plain single process. Calling it again with another layout re-creates the Megatron groups on the same
    process group (tests use this to compare layouts in one launch).
    """
    backend = _init_process_group(parallel_cfg.distributed_backend, parallel_cfg.distributed_timeout_minutes)
    cpu_compat.apply_cpu_compat()
    world = dist.get_world_size()
    dp = parallel_cfg.resolve_data_parallel_size(world)
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        distributed_timeout_minutes=parallel_cfg.distributed_timeout_minutes,
    )
    set_seeds(seed)
    info = ParallelInfo(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(),
        dp_size=dp,
        cp_size=mpu.get_context_parallel_world_size(),
        vpp_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        backend=backend,
        device=torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu"),
    )
    if info.rank == 0:
        logger.info(
            "parallel layout: world %d = TP %d x PP %d x CP %d x DP %d (VPP %s), backend %s",
            world,
            info.tp_size,
            info.pp_size,
            info.cp_size,
            dp,
            info.vpp_size,
            backend,
        )
    return info


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the process group (end of a run or a test). The CPU redirects stay."""
    global _env_set_here
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in _env_set_here:  # a later single-process start picks a fresh port
        os.environ.pop(key, None)
    _env_set_here = []
