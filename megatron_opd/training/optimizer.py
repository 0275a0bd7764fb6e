"""Megatron DDP, Megatron's Adam and the learning-rate schedule for the student, from ``OptimizerConfig``.

Why it exists: the optimizer side of a Megatron-core trainer is three objects that must agree (the DDP wrapper
whose contiguous gradient buffers the optimizer reads, ``get_megatron_optimizer`` with fp32 main params for
bf16, and the LR scheduler). Building them in one place keeps their settings consistent: gradients are reduced
in fp32, the distributed optimizer is an option, clipping is Megatron's global-norm clip over all model-parallel
ranks, and the LR follows Megatron's ``OptimizerParamScheduler`` (linear warmup, then constant, linear or cosine
decay to ``min_lr``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import get_model_config

from megatron_opd.config.tree import OptimizerConfig


def wrap_with_ddp(
    model_chunks: list[torch.nn.Module], *, use_distributed_optimizer: bool
) -> list[DistributedDataParallel]:
    """Wrap each chunk in Megatron's DDP (fp32 gradient buffers, reduction at the end of the step).

    Buckets are disabled on every chunk after the first, as Megatron-LM does for the interleaved schedule.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the step checks and skips non-finite steps itself
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        config = get_model_config(chunk)
        wrapped.append(DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0))
    for chunk in wrapped:
        chunk.broadcast_params()  # DP replicas start identical even if their seeds differed
    return wrapped


def megatron_optimizer_config(opt_cfg: OptimizerConfig, params_dtype: torch.dtype) -> MegatronOptimizerConfig:
    """Megatron's optimizer config: Adam, fp32 main params under bf16/fp16, the global-norm clip."""
    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=opt_cfg.use_distributed_optimizer,
    )


def build_lr_scheduler(
    optimizer: MegatronOptimizer, opt_cfg: OptimizerConfig, total_steps: int
) -> OptimizerParamScheduler:
    """Linear warmup over ``lr_warmup_steps``, then ``lr_decay_style`` decay to ``min_lr`` over ``lr_decay_steps``
    (``total_steps`` when unset). Stepped once per successful optimizer step.

    Megatron's scheduler gives step 0 the LR at 0 warmup steps (``init_lr`` = 0): a wasted update. It is
    advanced once here, so update k (0-based) uses the scheduler's value at k + 1: warmup reaches ``lr`` at
    update ``lr_warmup_steps - 1`` and the decay reaches ``min_lr`` at update ``lr_decay_steps - 1``.
    """
    decay_steps = opt_cfg.lr_decay_steps or max(total_steps, 1)
    decay_steps = max(decay_steps, opt_cfg.lr_warmup_steps + 1)  # Megatron requires decay > warmup
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt_cfg.lr_warmup_steps > 0 else opt_cfg.lr,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        lr_warmup_steps=opt_cfg.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=opt_cfg.lr_decay_style,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    scheduler.step(1)
    return scheduler


@dataclass
class TrainingObjects:
    """What a training step needs: DDP-wrapped chunks, the optimizer and the LR scheduler."""

    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler


def setup_training(
    model_chunks: list[torch.nn.Module], opt_cfg: OptimizerConfig, *, total_steps: int
) -> TrainingObjects:
    """Wrap ``model_chunks`` in DDP, build the optimizer and the scheduler, and wire Megatron's schedule hooks
    (gradient finalisation, no-sync during accumulation, loss scaling)."""
    config = get_model_config(model_chunks[0])
    model = wrap_with_ddp(model_chunks, use_distributed_optimizer=opt_cfg.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(megatron_optimizer_config(opt_cfg, config.params_dtype), model)
    scheduler = build_lr_scheduler(optimizer, opt_cfg, total_steps)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [chunk.no_sync for chunk in model] if len(model) > 1 else model[0].no_sync
    config.grad_scale_func = optimizer.scale_loss
    return TrainingObjects(model=model, optimizer=optimizer, scheduler=scheduler)
