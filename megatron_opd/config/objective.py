"""The ``horizon``, ``loss`` and ``optimizer`` sections of the config tree: what is distilled and how.

Why it exists: the paper's horizon control, the OPD objective and the optimizer that follows it, side by side
(``config/tree.py`` gathers every section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_opd.config.base import check_range, fail


@dataclass(kw_only=True)
class HorizonConfig:
    """Which prefix of each response is generated and distilled (the paper's horizon control)."""

    schedule: Literal["full", "truncated", "progressive", "segment", "adaptive"] = "progressive"
    """'full' (OPD), 'truncated' (TOPD, H = rho*T), 'progressive' (POPD, Eq. 11), 'segment' (distil [a, b)
    only, Section 6.3) or 'adaptive' (grow H when the current prefix is learned; see algorithms/horizon.py)."""
    rho: float = 0.25
    """TOPD truncation ratio: H = ceil(rho * max_response_length)."""
    h0: int = 9
    """POPD initial horizon H_0 in tokens."""
    delta_h: int = 9
    """POPD horizon increment dH in tokens (paper: 9)."""
    delta_k: int = 1
    """POPD steps between increments dk (paper: 1)."""
    segment_start: float = 0.0
    """Segment ablation: start a of the distilled window [a, b), a fraction of T_max or tokens (segment_unit)."""
    segment_end: float = 0.1
    """Segment ablation: end b of the distilled window [a, b)."""
    segment_unit: Literal["fraction", "tokens"] = "fraction"
    """Whether segment_start/segment_end are fractions of T_max or token counts."""
    adaptive_signal: Literal["log_ratio", "kl"] = "kl"
    """Adaptive: the per-token signal averaged over the last window of the horizon."""
    adaptive_threshold: float = 0.05
    """Adaptive: grow when the signal's moving mean falls below this (nats per token)."""
    adaptive_window: int = 16
    """Adaptive: how many last tokens of the current horizon the signal is measured over."""
    adaptive_patience: int = 2
    """Adaptive: consecutive steps the signal must stay below the threshold before growing."""
    adaptive_growth: int = 16
    """Adaptive: tokens added per growth (the cap on the growth rate)."""
    adaptive_min_steps_between: int = 1
    """Adaptive: fewest steps between two growths."""
    adaptive_max_steps_between: int | None = None
    """Adaptive: force a growth after this many steps without one (a floor on the growth rate); None: never."""
    adaptive_ema: float = 0.5
    """Adaptive: weight of the newest step in the signal's exponential moving mean."""

    def __post_init__(self) -> None:
        check_range("horizon.rho", self.rho, 0.0, 1.0, lo_open=True)
        check_range("horizon.h0", self.h0, 1)
        check_range("horizon.delta_h", self.delta_h, 0)
        check_range("horizon.delta_k", self.delta_k, 1)
        check_range("horizon.segment_start", self.segment_start, 0.0)
        if self.segment_end <= self.segment_start:
            fail(
                "horizon.segment_end",
                self.segment_end,
                f"a value greater than segment_start ({self.segment_start})",
            )
        if self.segment_unit == "fraction":
            check_range("horizon.segment_end", self.segment_end, 0.0, 1.0, lo_open=True)
        check_range("horizon.adaptive_threshold", self.adaptive_threshold, 0.0, lo_open=True)
        check_range("horizon.adaptive_window", self.adaptive_window, 1)
        check_range("horizon.adaptive_patience", self.adaptive_patience, 1)
        check_range("horizon.adaptive_growth", self.adaptive_growth, 1)
        check_range("horizon.adaptive_min_steps_between", self.adaptive_min_steps_between, 1)
        check_range("horizon.adaptive_max_steps_between", self.adaptive_max_steps_between, 1)
        check_range("horizon.adaptive_ema", self.adaptive_ema, 0.0, 1.0, lo_open=True)


@dataclass(kw_only=True)
class LossConfig:
    """The OPD objective: policy gradient on the log-ratio plus an optional top-K KL term."""

    gamma: float = 0.0
    """Discount of the return-to-go (Eq. 5): 0 is token-level OPD (paper default), 1 is sequence-level."""
    pg_coef: float = 1.0
    """Weight of the policy-gradient term -sg(A_t) * log p_student(y_t)."""
    topk_kl_coef: float = 0.0
    """Weight of the reverse-KL term over the top-K tokens (teacher.topk, teacher.topk_strategy)."""
    topk_renormalize: bool = True
    """Renormalise both distributions over the K tokens before the KL (true) or use the raw masses."""
    full_kl_coef: float = 0.0
    """Weight of the exact reverse KL(student || teacher) over the whole vocabulary at every distilled token
    (sum_v p_S (log p_S - log p_T)); needs teacher.backend 'megatron', the only teacher whose full distribution
    the loss sees (computed over vocabulary tiles, loss/two_model.py)."""
    normalization: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    """token_mean: divide by the global count of distilled tokens; sequence_mean: mean over sequences of each
    sequence's token mean; constant: divide by loss.normalization_constant (e.g. T_max times batch)."""
    normalization_constant: float = 1.0
    """Divisor for normalization='constant'."""
    impl: Literal["auto", "reference", "chunked", "triton"] = "auto"
    """Loss implementation: the fp32 reference, chunked pure torch, the fused Triton kernel, or auto (Triton on
    CUDA, chunked otherwise)."""
    chunk_size: int = 1024
    """Tokens per chunk in the chunked and fused paths."""
    fp8_lm_head: bool = False
    """Run the LM-head gradient GEMMs of the chunked/triton path in FP8 (Hopper GPUs; adapter ``fp8=True``;
    with teacher.backend 'megatron' the student's gradient GEMMs of loss/two_model.py, the teacher has none).
    The logits stay bf16-in/fp32-out, so log p and the loss keep full accuracy (see loss/fp8.py)."""

    def __post_init__(self) -> None:
        check_range("loss.gamma", self.gamma, 0.0, 1.0)
        check_range("loss.pg_coef", self.pg_coef, 0.0)
        check_range("loss.topk_kl_coef", self.topk_kl_coef, 0.0)
        check_range("loss.full_kl_coef", self.full_kl_coef, 0.0)
        check_range("loss.normalization_constant", self.normalization_constant, 0.0, lo_open=True)
        check_range("loss.chunk_size", self.chunk_size, 1)
        if self.fp8_lm_head and self.impl == "reference":
            fail(
                "loss.fp8_lm_head",
                True,
                "false with loss.impl 'reference' (which computes the full logits and has no FP8 GEMM), or set "
                "loss.impl to 'chunked', 'triton' or 'auto'",
            )
        if self.pg_coef == 0.0 and self.topk_kl_coef == 0.0 and self.full_kl_coef == 0.0:
            fail(
                "loss.pg_coef",
                0.0,
                "a positive value (or set loss.topk_kl_coef or loss.full_kl_coef > 0): the loss would be zero",
            )


@dataclass(kw_only=True)
class OptimizerConfig:
    """Adam, its learning-rate schedule and gradient clipping (Megatron's names)."""

    optimizer: Literal["adam"] = "adam"
    """Optimizer (Adam with decoupled weight decay, as Megatron's 'adam')."""
    lr: float = 1e-6
    """Peak learning rate (paper: 1e-6)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_steps: int = 0
    """Linear warmup steps."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup."""
    lr_decay_steps: int | None = None
    """Steps over which the LR decays; None uses the run's total steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    def __post_init__(self) -> None:
        check_range("optimizer.lr", self.lr, 0.0, lo_open=True)
        check_range("optimizer.min_lr", self.min_lr, 0.0, self.lr)
        check_range("optimizer.lr_warmup_steps", self.lr_warmup_steps, 0)
        check_range("optimizer.lr_decay_steps", self.lr_decay_steps, 1)
        check_range("optimizer.weight_decay", self.weight_decay, 0.0)
        check_range("optimizer.adam_beta1", self.adam_beta1, 0.0, 1.0, hi_open=True)
        check_range("optimizer.adam_beta2", self.adam_beta2, 0.0, 1.0, hi_open=True)
        check_range("optimizer.adam_eps", self.adam_eps, 0.0, lo_open=True)
        check_range("optimizer.clip_grad", self.clip_grad, 0.0)
