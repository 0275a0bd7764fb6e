"""Triton kernels for the two-model loss (``two_model.py``): the per-tile work after the two LM-head GEMMs.

Why it exists: per vocabulary tile the two-model loss multiplies both models' hidden states by their LM-head
tiles (cuBLAS, as the single-model path: a Triton GEMM would not beat it) and then makes several memory-bound
passes over the two [C, t] logits blocks: each model's max and sum-exp, the student's full-KL accumulator, the
logits at the sampled token; in backward the dense part of dL/dz_S. In torch these are a dozen kernels with
[C, t] temporaries; here each direction is ONE pass that reads each block once and writes nothing but the
per-row state (forward) or dz in place of z_S (backward).

- ``tile_stats_``: folds a tile pair (z_S, z_T) [C, t] into the per-row state [7, C] fp32 (rows: m_S, l_S,
  a, m_T, l_T, z_S[y], z_T[y]) with an online softmax; a = sum_v exp(z_S - m_S)(z_S - z_T) is rescaled with
  l_S when the max moves (``two_model``'s module doc has the math). The logits at the sampled token y are
  gathered from the tile that holds y (a rank's partial sum: 0 where no tile of it holds y).
- ``tile_grad_``: z_S <- -c p_S (+ g_full p_S ((log p_S - log p_T) - KL_full)), the dense part of dL/dz_S;
  ``chunked._scatter_local_`` then adds the one-hot terms, as in ``chunked.logits_grad_``.

The student's top-K per tile stays ``two_model.tile_topk`` (torch.topk on exact int64 keys): a K-selection in
Triton would need a sort per row, and the K candidates per tile are tiny next to the GEMMs. The logits at the K
ids are found after the pass (``two_model.logits_at``, C K H FLOPs) because the ids are only known then.

Without CUDA, importing this module switches Triton to its interpreter (``parallel.cpu_compat``); that is for
tests only (milliseconds per row of a tile).
"""

from __future__ import annotations

import torch

from megatron_opd.parallel.cpu_compat import use_triton_interpreter

use_triton_interpreter()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["STATE_ROWS", "new_state", "tile_stats_", "tile_grad_"]

_BLOCK_V = 1024
STATE_ROWS = 7  # m_S, l_S, a, m_T, l_T, z_S[y], z_T[y]


@triton.jit
def _tile_stats_kernel(
    zs_ptr, stride_s, zt_ptr, stride_t, st_ptr, stride_st, y_ptr, start, V, FULL: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    zs_base = zs_ptr + row * stride_s
    zt_base = zt_ptr + row * stride_t
    m_s = tl.load(st_ptr + row)
    l_s = tl.load(st_ptr + stride_st + row)
    a = tl.load(st_ptr + 2 * stride_st + row)
    m_t = tl.load(st_ptr + 3 * stride_st + row)
    l_t = tl.load(st_ptr + 4 * stride_st + row)
    for off in range(0, V, BLOCK_V):
        offs = off + tl.arange(0, BLOCK_V)
        mask = offs < V
        # Columns past the tile load as 0 (finite: z_S - z_T stays defined) and count as -inf in the maxima.
        xs = tl.load(zs_base + offs, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(zt_base + offs, mask=mask, other=0.0).to(tl.float32)
        # Every block holds at least one real column, so the new maxima are finite; exp(-inf - finite) = 0
        # makes the first block's rescale of the empty state vanish.
        ms_new = tl.maximum(m_s, tl.max(tl.where(mask, xs, float("-inf")), axis=0))
        mt_new = tl.maximum(m_t, tl.max(tl.where(mask, xt, float("-inf")), axis=0))
        scale_s = tl.exp(m_s - ms_new)
        es = tl.where(mask, tl.exp(xs - ms_new), 0.0)
        l_s = l_s * scale_s + tl.sum(es, axis=0)
        if FULL:
            a = a * scale_s + tl.sum(es * (xs - xt), axis=0)
        l_t = l_t * tl.exp(m_t - mt_new) + tl.sum(tl.where(mask, tl.exp(xt - mt_new), 0.0), axis=0)
        m_s = ms_new
        m_t = mt_new
    tl.store(st_ptr + row, m_s)
    tl.store(st_ptr + stride_st + row, l_s)
    tl.store(st_ptr + 2 * stride_st + row, a)
    tl.store(st_ptr + 3 * stride_st + row, m_t)
    tl.store(st_ptr + 4 * stride_st + row, l_t)
    col = tl.load(y_ptr + row) - start
    inside = (col >= 0) & (col < V)
    col = tl.where(inside, col, 0)
    zs_y = tl.load(zs_base + col, mask=inside, other=0.0).to(tl.float32)
    zt_y = tl.load(zt_base + col, mask=inside, other=0.0).to(tl.float32)
    tl.store(st_ptr + 5 * stride_st + row, tl.load(st_ptr + 5 * stride_st + row) + zs_y)
    tl.store(st_ptr + 6 * stride_st + row, tl.load(st_ptr + 6 * stride_st + row) + zt_y)


@triton.jit
def _tile_grad_kernel(
    zs_ptr, stride_s, zt_ptr, stride_t, lse_s_ptr, lse_t_ptr, c_ptr, g_full_ptr, kl_ptr, V,
    FULL: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    zs_base = zs_ptr + row * stride_s
    lse_s = tl.load(lse_s_ptr + row)
    c = tl.load(c_ptr + row)
    if FULL:
        zt_base = zt_ptr + row * stride_t
        lse_t = tl.load(lse_t_ptr + row)
        g_full = tl.load(g_full_ptr + row)
        kl = tl.load(kl_ptr + row)
    for off in range(0, V, BLOCK_V):
        offs = off + tl.arange(0, BLOCK_V)
        mask = offs < V
        logp_s = tl.load(zs_base + offs, mask=mask, other=0.0).to(tl.float32) - lse_s
        p = tl.exp(logp_s)
        dz = -c * p
        if FULL:
            logp_t = tl.load(zt_base + offs, mask=mask, other=0.0).to(tl.float32) - lse_t
            dz += g_full * p * ((logp_s - logp_t) - kl)
        tl.store(zs_base + offs, dz, mask=mask)


def _block(v: int, block_v: int | None) -> int:
    """Columns per inner block: ``block_v`` rounded up to a power of two, default min(1024, t rounded up)."""
    return triton.next_power_of_2(block_v) if block_v else min(_BLOCK_V, triton.next_power_of_2(max(v, 1)))


def new_state(c: int, device: torch.device) -> torch.Tensor:
    """The empty per-row state [STATE_ROWS, C] fp32: maxima -inf, sums and gathered logits 0."""
    st = torch.zeros(STATE_ROWS, c, dtype=torch.float32, device=device)
    st[0] = st[3] = -float("inf")
    return st


def tile_stats_(
    zs: torch.Tensor,
    zt: torch.Tensor,
    state: torch.Tensor,
    targets: torch.Tensor,
    start: int,
    full_kl: bool,
    block_v: int | None = None,
) -> None:
    """Fold one tile pair into ``state`` in place (module doc).

    zs [C, t], zt [C, t] fp32 with contiguous rows (this tile of each model's logits, columns = ids
    ``start .. start + t - 1``); state [STATE_ROWS, C] fp32 (``new_state``); targets [C] global ids.
    Without ``full_kl`` the accumulator a (row 2) is left at 0. ``block_v``: inner block width (``_block``).
    """
    assert zs.shape == zt.shape and zs.dim() == 2 and zs.stride(-1) == 1 and zt.stride(-1) == 1
    assert zs.dtype == zt.dtype == torch.float32 and state.shape == (STATE_ROWS, zs.shape[0])
    c, v = zs.shape
    if c and v:
        _tile_stats_kernel[(c,)](
            zs, zs.stride(0), zt, zt.stride(0), state, state.stride(0), targets.contiguous(), start, v,
            FULL=full_kl, BLOCK_V=_block(v, block_v),
        )  # fmt: skip


def tile_grad_(
    zs: torch.Tensor,
    lse_s: torch.Tensor,
    coef: torch.Tensor,
    zt: torch.Tensor | None = None,
    lse_t: torch.Tensor | None = None,
    g_full: torch.Tensor | None = None,
    kl_full: torch.Tensor | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """zs <- -coef p_S (+ g_full p_S ((log p_S - log p_T) - kl_full) when ``zt`` is given), in place; returns zs.

    zs, zt [C, t] fp32 logits tiles with contiguous rows; lse_s, lse_t, coef, g_full, kl_full [C] fp32, where
    coef = g_logp + sum_k g_s[k] (module doc of ``two_model``).
    """
    assert zs.dim() == 2 and zs.stride(-1) == 1 and zs.dtype == torch.float32
    full = zt is not None
    if full:
        assert zt.shape == zs.shape and zt.stride(-1) == 1 and zt.dtype == torch.float32
    c, v = zs.shape
    if c and v:
        f32 = lambda x: x.float().contiguous()  # noqa: E731
        lse_s, coef = f32(lse_s), f32(coef)
        extra = (
            (f32(lse_t), f32(g_full), f32(kl_full)) if full else (lse_s, lse_s, lse_s)
        )  # unused if not full
        _tile_grad_kernel[(c,)](
            zs, zs.stride(0), zt if full else zs, zt.stride(0) if full else zs.stride(0), lse_s, extra[0], coef,
            extra[1], extra[2], v, FULL=full, BLOCK_V=_block(v, block_v),
        )  # fmt: skip
    return zs
