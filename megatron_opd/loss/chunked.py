"""The LM-head + OPD token terms, one chunk of tokens at a time, so the [N, V] logits never exist.

Why it exists: for 16,384 tokens and a 151,936-token vocabulary the fp32 logits alone are 9.96 GB. Here only a
[chunk, V/tp] block is alive at once; the loop and the per-chunk math are shared by the pure-torch path
(``backend='torch'``) and the Triton path (``backend='triton'``, which swaps in two kernels from
``triton_kernels.py`` for the softmax statistics and the in-place logits gradient). Everything that is not
the [chunk, V] softmax itself comes from ``reference.py`` (``gather_logits``, ``topk_ids``, ``topk_reverse_kl``,
``tp_max``/``tp_sum``), so there is one statement of the math; the log-partition is ``reference.log_partition``'s
formula evaluated from per-row (max, sum-exp) pairs so that no second [chunk, V] block is allocated.

The logits gradient, for a row with upstream gradients g_logp (on log p(y)) and g_s[k] (on the K student
logprobs s_k = z[id_k] - lse that feed the top-K KL):

    dL/dz = g_logp * onehot(y) + sum_k g_s[k] * onehot(id_k) - (g_logp + sum_k g_s[k]) * softmax(z)

so only lse [N] (and the small s [N, K]) must be kept between forward and backward; g_s comes from autograd
through ``reference.topk_reverse_kl`` on the [N, K] tensor. With vocabulary parallelism each rank applies this
to its own shard: the one-hots land only where the id is local, and lse is already global.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from megatron_opd.loss import fp8 as fp8_mm
from megatron_opd.loss.reference import gather_logits, topk_ids, topk_reverse_kl, tp_max, tp_sum

Backend = Literal["torch", "triton"]


# ----------------------------------------------------------------------------------------------------------
# GEMMs: bf16/fp16 inputs, fp32 accumulation and fp32 logits
# ----------------------------------------------------------------------------------------------------------
_MM_OUT_DTYPE_OK: bool | None = None  # does this torch build have CUDA mm(..., out_dtype=float32)?


def _half_mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a @ b (CUDA, half operands) with an fp32 result from cuBLAS, or None where the build lacks it."""
    global _MM_OUT_DTYPE_OK
    if _MM_OUT_DTYPE_OK is False:
        return None
    try:
        out = torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        _MM_OUT_DTYPE_OK = False
        warnings.warn(
            f"torch.mm(out_dtype=float32) unavailable ({e}); upcasting GEMM operands instead", stacklevel=2
        )
        return None
    _MM_OUT_DTYPE_OK = True
    return out


def matmul_nt_fp32(
    a: torch.Tensor, b: torch.Tensor, fp8: bool = False, b_fp8: fp8_mm.Quantized | None = None
) -> torch.Tensor:
    """a @ b^T with fp32 accumulation and an fp32 result. a [M, K], b [N, K] -> [M, N] fp32.

    On CUDA half inputs use cuBLAS' half-in/fp32-out GEMM (``torch.mm(..., out_dtype=float32)``) so the
    logits are not rounded to bf16; elsewhere (or where that is missing) the operands are upcast.
    ``fp8`` routes through ``fp8.matmul_nt``, with ``b_fp8`` (b already quantised) when given.
    """
    if fp8:
        return fp8_mm.matmul_nt(a, b if b_fp8 is None else b_fp8)
    if a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        out = _half_mm_fp32(a, b.t())
        if out is not None:
            return out
    return torch.mm(a.float(), b.float().t())


def matmul_nn_into(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    fp8: bool = False,
    bt_fp8: fp8_mm.Quantized | None = None,
) -> None:
    """out += a @ b in fp32. a [M, K] fp32, b [K, N] (any float), out [M, N] fp32.

    Used for d hidden = dz @ W and d W = dz^T @ h. On CUDA with half operands dz is cast to b's dtype first
    (as Liger does) so the GEMM runs on tensor cores; the accumulation stays fp32. With ``fp8``, ``bt_fp8``
    is b^T already quantised (``fp8.quantize_operand(b.t())``), when given.
    """
    if fp8:
        out += fp8_mm.matmul_nt(a, b.t() if bt_fp8 is None else bt_fp8)
        return
    if b.dtype in (torch.bfloat16, torch.float16) and b.is_cuda:
        prod = _half_mm_fp32(a.to(b.dtype), b)
        out += prod if prod is not None else torch.mm(a.to(b.dtype), b).float()
        return
    out.addmm_(a.float(), b.float())


# ----------------------------------------------------------------------------------------------------------
# per-chunk math
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ChunkTerms:
    """Per-token outputs of one chunk of C tokens (all fp32, no gradient)."""

    lse: torch.Tensor
    """[C] global log-partition."""
    logp: torch.Tensor
    """[C] log p(y_t)."""
    ids: torch.Tensor | None
    """[C, K] top-K ids used (given or chosen here), or None."""
    s: torch.Tensor | None
    """[C, K] student logprobs at ``ids`` (only when the KL is computed)."""
    kl: torch.Tensor | None
    """[C] top-K reverse KL, or None."""


_ROWS = 64  # row sub-block of the torch backend's sum-exp: bounds its temporary to [64, V/tp]


def _row_max_sumexp_torch(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (max, sum exp(z - max)) over the local vocabulary. z [C, V/tp] -> ([C], [C]).

    Row sub-blocks keep the exp temporary at [64, V/tp] instead of a second and third [C, V/tp] block.
    """
    m = z.max(dim=-1).values
    s = torch.empty_like(m)
    for i in range(0, z.shape[0], _ROWS):
        s[i : i + _ROWS] = torch.exp(z[i : i + _ROWS] - m[i : i + _ROWS, None]).sum(-1)
    return m, s


def chunk_log_partition(
    z: torch.Tensor, tp_group: dist.ProcessGroup | None, backend: Backend
) -> torch.Tensor:
    """Global log-partition [C] of a logits chunk z [C, V/tp]: ``reference.log_partition``'s max-shifted
    combination, applied to per-rank (max, sum-exp) pairs that are computed without extra [C, V] copies."""
    if backend == "torch":
        m, s = _row_max_sumexp_torch(z)
    else:
        from megatron_opd.loss.triton_kernels import row_max_sumexp

        m, s = row_max_sumexp(z)
    gm = tp_max(m, tp_group)
    return gm + torch.log(tp_sum(s * torch.exp(m - gm), tp_group))


def chunk_forward(
    z: torch.Tensor,
    targets: torch.Tensor,
    ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    *,
    topk: int,
    renormalize: bool,
    vocab_start: int,
    tp_group: dist.ProcessGroup | None,
    backend: Backend,
) -> ChunkTerms:
    """The token terms of one chunk from its fp32 logits z [C, V/tp] (as reference.opd_token_terms_from_logits)."""
    lse = chunk_log_partition(z, tp_group, backend)
    logp = gather_logits(z, targets.unsqueeze(-1), vocab_start, tp_group).squeeze(-1) - lse
    if ids is None and topk > 0:
        ids = topk_ids(z, topk, vocab_start, tp_group)
    s = kl = None
    if ids is not None and teacher_logprobs is not None:
        s = gather_logits(z, ids, vocab_start, tp_group) - lse.unsqueeze(-1)
        kl = topk_reverse_kl(s, teacher_logprobs, renormalize)
    return ChunkTerms(lse=lse, logp=logp, ids=ids, s=s, kl=kl)


def kl_grad(
    s: torch.Tensor, teacher_logprobs: torch.Tensor, renormalize: bool, g_kl: torch.Tensor
) -> torch.Tensor:
    """dL/ds [N, K] from the upstream g_kl [N], by autograd through ``reference.topk_reverse_kl``."""
    with torch.enable_grad():
        s_leaf = s.detach().float().requires_grad_(True)
        kl = topk_reverse_kl(s_leaf, teacher_logprobs, renormalize)
        (g_s,) = torch.autograd.grad(kl, s_leaf, g_kl.float())
    return g_s


def _scatter_local_(
    dz: torch.Tensor, ids: torch.Tensor, coef: torch.Tensor, vocab_start: int
) -> None:  # dz [C, V/tp], ids/coef [C, K]
    local = ids - vocab_start
    inside = (local >= 0) & (local < dz.shape[-1])
    coef = torch.where(inside, coef, torch.zeros_like(coef)).to(dz.dtype)
    dz.scatter_add_(1, local.clamp(0, dz.shape[-1] - 1), coef)


def logits_grad_(
    z: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    g_logp: torch.Tensor,
    ids: torch.Tensor | None,
    g_s: torch.Tensor | None,
    *,
    vocab_start: int,
    backend: Backend,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """dL/dz [C, V/tp] (module doc) from the fp32 logits z, which it overwrites (or, with the Triton backend
    and a half ``out_dtype``, reads once while writing dz to a new half-precision block)."""
    c = g_logp.float() if g_s is None else g_logp.float() + g_s.sum(-1)
    if backend == "torch":
        dz = z.sub_(lse.unsqueeze(-1)).exp_().mul_(-c.unsqueeze(-1))
        dz = dz if out_dtype == torch.float32 else dz.to(out_dtype)
    else:
        from megatron_opd.loss.triton_kernels import softmax_scale_

        out = None if out_dtype == torch.float32 else torch.empty(z.shape, dtype=out_dtype, device=z.device)
        dz = softmax_scale_(z, lse, -c, out=out)
    _scatter_local_(dz, targets.unsqueeze(-1), g_logp.float().unsqueeze(-1), vocab_start)
    if g_s is not None and ids is not None:
        _scatter_local_(dz, ids, g_s, vocab_start)
    return dz


def chunks(n: int, chunk_size: int) -> list[slice]:
    """Token slices of at most ``chunk_size``."""
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


@dataclass(frozen=True)
class Fp8Weight:
    """The LM-head weight W [V/tp, H] quantised once per forward or backward of the loss, for every chunk."""

    logits: fp8_mm.Quantized | None
    """W for z = h @ W^T (scales per vocabulary row), when the logits GEMM runs in FP8."""
    grad_hidden: fp8_mm.Quantized | None
    """W^T [H, V/tp] for d hidden = dz @ W (scales per hidden row), when the gradient GEMMs run in FP8."""


def quantize_weight(weight: torch.Tensor, logits: bool, grad_hidden: bool) -> Fp8Weight:
    """The FP8 forms of W [V/tp, H] that the chunk loop will need (None for a GEMM that is not FP8)."""
    return Fp8Weight(
        logits=fp8_mm.quantize_operand(weight) if logits else None,
        grad_hidden=fp8_mm.quantize_operand(weight.t()) if grad_hidden else None,
    )


def accumulate_grads(
    dz: torch.Tensor,
    hidden_c: torch.Tensor,
    weight: torch.Tensor,
    grad_hidden_c: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    fp8: bool = False,
    weight_fp8: Fp8Weight | None = None,
) -> None:
    """grad_hidden_c += dz @ W; grad_weight += dz^T @ h (fp32; None skips that GEMM).

    dz [C, V/tp], hidden_c [C, H], W [V/tp, H], grad_hidden_c [C, H], grad_weight [V/tp, H]. With ``fp8``,
    ``weight_fp8`` (``quantize_weight``) saves quantising W again for this chunk.
    """
    if grad_hidden_c is not None:
        wt = None if weight_fp8 is None else weight_fp8.grad_hidden
        matmul_nn_into(grad_hidden_c, dz, weight, fp8, wt)
    if grad_weight is not None:
        matmul_nn_into(grad_weight, dz.t(), hidden_c, fp8)
