"""Triton kernels for the fused LM-head + OPD loss: the softmax over vocabulary tiles of one token chunk.

Why it exists: after the logits GEMM of a chunk (cuBLAS), the rest of the loss is memory-bound passes over the
[C, V/tp] block. These kernels do each in one pass without temporaries: ``row_max_sumexp`` streams the vocab
in BLOCK_V tiles with an online softmax (running max, rescaled sum-exp), and ``softmax_scale_`` overwrites the
logits with c * softmax(z) in place (the dense part of dL/dz; ``chunked.logits_grad_`` adds the sparse
one-hot terms). The GEMMs stay in cuBLAS (as in Liger-Kernel's fused linear cross-entropy): a Triton GEMM would
not beat it, and the chunk block is what keeps the [N, V] logits from existing.

Without CUDA, importing this module switches Triton to its interpreter (``parallel.cpu_compat`` redirect 8) so
the kernels run on CPU tensors; that is for tests only (about 4 ms per row of 4,096 columns).
"""

from __future__ import annotations

import torch

from megatron_opd.parallel.cpu_compat import use_triton_interpreter

use_triton_interpreter()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_BLOCK_V = 1024


@triton.jit
def _row_max_sumexp_kernel(z_ptr, stride_z, max_ptr, sumexp_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Every tile holds at least one real column, so m_new is finite and exp(m - m_new) is 0 on the first.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(max_ptr + row, m)
    tl.store(sumexp_ptr + row, s)


@triton.jit
def _softmax_scale_kernel(z_ptr, stride_z, out_ptr, stride_out, lse_ptr, coef_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    out_base = out_ptr + row * stride_out
    lse = tl.load(lse_ptr + row)
    c = tl.load(coef_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        tl.store(out_base + offs, (c * tl.exp(x - lse)).to(out_ptr.dtype.element_ty), mask=mask)


def _block(v: int, block_v: int | None) -> int:
    return triton.next_power_of_2(block_v) if block_v else min(_BLOCK_V, triton.next_power_of_2(v))


def row_max_sumexp(z: torch.Tensor, block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (max_v z, sum_v exp(z - max)) over this rank's vocabulary. z [C, V/tp] fp32 -> ([C], [C]) fp32.

    ``block_v``: vocabulary tile width (a power of two; default min(1024, V rounded up)).
    """
    assert z.dim() == 2 and z.stride(-1) == 1, "logits chunk must be 2-D with contiguous rows"
    c, v = z.shape
    m = torch.empty(c, dtype=torch.float32, device=z.device)
    s = torch.empty(c, dtype=torch.float32, device=z.device)
    if c:
        _row_max_sumexp_kernel[(c,)](z, z.stride(0), m, s, v, BLOCK_V=_block(v, block_v))
    return m, s


def softmax_scale_(
    z: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    block_v: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out <- coef * exp(z - lse) per row; in place in z when ``out`` is None. z [C, V/tp] fp32, lse [C],
    coef [C], out [C, V/tp] of any float dtype (bf16 halves the write and feeds the tensor-core GEMMs)."""
    assert z.dim() == 2 and z.stride(-1) == 1 and z.dtype == torch.float32
    out = z if out is None else out
    assert out.shape == z.shape and out.stride(-1) == 1
    c, v = z.shape
    if c:
        lse = lse.float().contiguous()
        coef = coef.float().contiguous()
        _softmax_scale_kernel[(c,)](
            z, z.stride(0), out, out.stride(0), lse, coef, v, BLOCK_V=_block(v, block_v)
        )
    return out
