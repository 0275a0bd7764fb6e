"""FP8 GEMMs for the fused LM-head + OPD loss (Hopper and later; also runs, slowly, on CPU for tests).

Why it exists: in the fused loss the three LM-head GEMMs (logits, d hidden, d weight) are nearly all the
time; FP8 tensor cores run them about twice as fast as bf16. Everything else in the loss stays fp32.

Scaling: each operand is quantised to ``float8_e4m3fn`` with a scale per row of the contraction (``'row'``,
default: one scale per token row of the hidden states, per vocabulary row of the weight, ...) or one scale for
the whole tensor (``'tensor'``). ``torch._scaled_mm`` multiplies the FP8 operands with fp32 accumulation and
applies the scales on the output. Transformer-Engine is not used: it cannot be imported without CUDA, and
``_scaled_mm`` covers the one GEMM shape we need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Scaling = Literal["row", "tensor"]
Fp8Mode = Literal["off", "grads", "all"]
"""Which LM-head GEMMs of the fused loss run in FP8: none; the two gradient GEMMs (d hidden = dz @ W,
d W = dz^T @ h), keeping the logits and so log p, the KL and the loss at bf16-input/fp32 accuracy; or all three,
including the logits (measured: e4m3 logits move log p by ~0.1 on average at H = 1536, see the test)."""

FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_ALIGN = 16  # _scaled_mm needs every dimension a multiple of 16 on CUDA


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if x.shape == (rows, cols):
        return x
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def quantize(x: torch.Tensor, scaling: Scaling = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float, any strides) -> (contiguous FP8 [M, K], fp32 scale [M, 1] or []), x ~= q * scale."""
    amax = (x.abs().amax(dim=-1, keepdim=True) if scaling == "row" else x.abs().amax()).float()
    # An all-zero row gets scale 1 (its quantised values are zero anyway) instead of a division by zero.
    scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
    q = (x.float() / scale).clamp_(-_FP8_MAX, _FP8_MAX).to(FP8_DTYPE).contiguous()
    return q, scale


@dataclass(frozen=True)
class Quantized:
    """A right-hand GEMM operand b [N, K] quantised once for many ``matmul_nt(a, b)`` (the LM-head weight is
    the same for every chunk of tokens: quantising it per chunk would re-read and re-scale V x H values each
    time). ``q`` [Np, Kp] FP8 and ``scale`` ([Np, 1] or []) as ``quantize`` returns them for b zero-padded to
    multiples of 16; ``shape`` is b's unpadded (N, K)."""

    q: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    scaling: Scaling


def quantize_operand(b: torch.Tensor, scaling: Scaling = "row") -> Quantized:
    """b [N, K] -> its ``Quantized`` form (padded to multiples of 16, scaled along K)."""
    n, k = b.shape
    q, scale = quantize(_pad_to(b, _round_up(n), _round_up(k)), scaling)
    return Quantized(q, scale, (n, k), scaling)


def matmul_nt(
    a: torch.Tensor,
    b: torch.Tensor | Quantized,
    scaling: Scaling = "row",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a @ b^T through FP8 operands with fp32 accumulation. a [M, K], b [N, K] -> [M, N] ``out_dtype``.

    ``b`` may be given already quantised (``quantize_operand``), with the same ``scaling``; the result is then
    bit-identical to passing the tensor. Both operands are scaled along K (the contraction), so per-row scales
    factor out of the sum exactly. Dimensions are zero-padded to multiples of 16 (zeros change neither the sums
    nor the row scales). On CUDA, row-wise scaled ``_scaled_mm`` only writes bf16, so the product is rounded to
    bf16 (2^-9 relative, far below the FP8 operand error of ~2^-5) before the cast to ``out_dtype``.
    """
    if not isinstance(b, Quantized):
        b = quantize_operand(b, scaling)
    elif b.scaling != scaling:
        raise ValueError(f"b was quantised with scaling {b.scaling!r}, the product asks for {scaling!r}")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(
            f"matmul_nt: a is [{m}, {k}] but b is {list(b.shape)}; their last dimensions must match"
        )
    mp, kp, np_ = _round_up(m), _round_up(k), _round_up(n)
    qa, sa = quantize(_pad_to(a, mp, kp), scaling)
    sb = b.scale
    if scaling == "row":
        sb = sb.reshape(1, np_)
    else:
        sa, sb = sa.reshape(()), sb.reshape(())
    mm_dtype = torch.bfloat16 if (a.is_cuda and scaling == "row") else out_dtype
    out = torch._scaled_mm(qa, b.q.t(), scale_a=sa, scale_b=sb, out_dtype=mm_dtype)
    return out[:m, :n].to(out_dtype)
