"""The Triton softmax kernels (run by Triton's interpreter on CPU) against torch, across vocabulary tiles.

Tolerance (fp32 only, the kernels' one dtype): atol 1e-5 / rtol 1e-5 on max + log(sum-exp) and on
c * softmax. Both sides are fp32; the online softmax rescales partial sums tile by tile, which reorders
additions (relative error ~ number of tiles x 2^-24, far below 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.loss import triton_kernels as tk


def _logits(c: int, v: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = 4 * torch.randn(c, v, generator=g)
    z[0, -1] = 80.0  # the row max in the last, partial tile: the running max must rescale earlier tiles
    if c > 1:
        z[1, :] = -1e4  # a flat, very negative row
    return z


@pytest.mark.parametrize("block_v", [16, 64, None], ids=["tile16", "tile64", "one_tile"])
def test_row_max_sumexp_is_logsumexp(block_v):
    z = _logits(5, 299)
    m, s = tk.row_max_sumexp(z, block_v=block_v)
    torch.testing.assert_close(m, z.max(-1).values, atol=0, rtol=0)  # a max is exact
    torch.testing.assert_close(m + s.log(), torch.logsumexp(z, -1), atol=1e-5, rtol=1e-5)


def test_row_max_sumexp_on_a_row_slice_with_stride():
    z = _logits(4, 301)
    view = z[:, 7:250]  # rows not contiguous with each other: the kernel must use the row stride
    m, s = tk.row_max_sumexp(view, block_v=32)
    torch.testing.assert_close(m + s.log(), torch.logsumexp(view, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_v", [16, None], ids=["tile16", "one_tile"])
def test_softmax_scale_in_place(block_v):
    z = _logits(5, 299, seed=1)
    coef = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0])
    expect = coef[:, None] * torch.softmax(z, -1)
    out = tk.softmax_scale_(z, torch.logsumexp(z, -1), coef, block_v=block_v)
    assert out.data_ptr() == z.data_ptr()  # in place: no second [C, V] block
    torch.testing.assert_close(z, expect, atol=1e-5, rtol=1e-5)


def test_empty_chunk():
    m, s = tk.row_max_sumexp(torch.empty(0, 17))
    assert m.shape == s.shape == (0,)


def test_softmax_scale_into_a_bf16_block_leaves_z_alone():
    """The CUDA gradient path writes dz straight into a bf16 block. Tolerance: one bf16 step, 2^-7 relative:
    compiled Triton rounds to nearest even (2^-8), but the CPU interpreter truncates (measured: its result is
    bit-equal to zeroing the low 16 bits), which costs up to a full step."""
    z = _logits(5, 299, seed=2)
    z0 = z.clone()
    coef = torch.tensor([1.0, -2.0, 0.5, 0.5, 3.0])
    out = torch.empty(z.shape, dtype=torch.bfloat16)
    got = tk.softmax_scale_(z, torch.logsumexp(z, -1), coef, block_v=64, out=out)
    assert got is out and torch.equal(z, z0)
    torch.testing.assert_close(
        out.float(), coef[:, None] * torch.softmax(z0, -1), atol=1e-6, rtol=2**-7, check_dtype=False
    )
