"""The FP8 GEMM path (``torch._scaled_mm`` also runs on CPU) against fp32, within bounds derived from e4m3.

float8_e4m3fn keeps 3 mantissa bits: round-to-nearest makes each quantised value off by at most 2^-4
relative (after scaling the row max to 448, away from the subnormal range). A product of two such values is
off by at most (1 + 2^-4)^2 - 1 < 0.13 relative, so |fp8 dot - exact dot| <= 0.13 * sum_i |a_i b_i|. The
tests assert that first-principles bound (a wrong scale or axis breaks it by orders of magnitude) and a
typical-case error well below it.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.loss import adapter, fp8

BOUND = (1 + 2**-4) ** 2 - 1


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_matmul_nt_within_e4m3_bound(scaling):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 51, generator=g) * torch.logspace(-2, 2, 37)[:, None]  # rows of very different scale
    b = torch.randn(23, 51, generator=g)
    got = fp8.matmul_nt(a, b, scaling)
    exact = a @ b.t()
    abs_sum = a.abs() @ b.abs().t()
    assert got.shape == (37, 23) and got.dtype == torch.float32
    if scaling == "row":  # per-row scales keep every row in e4m3's normal range
        assert ((got - exact).abs() <= BOUND * abs_sum + 1e-6).all()
        assert ((got - exact).abs() / abs_sum).mean() < 0.02
    else:  # one scale: rows 10^4 below the max fall into subnormals and lose precision, but not the large ones
        big = slice(30, 37)
        assert ((got - exact)[big].abs() <= BOUND * abs_sum[big] + 1e-6).all()


def test_quantize_zero_row_is_finite():
    q, s = fp8.quantize(torch.zeros(2, 16))
    assert torch.isfinite(s).all() and (q.float() == 0).all()


def test_fp8_chunked_terms_close_to_fp32_reference():
    """logp error <= 2 * max logit error (log-sum-exp is 1-Lipschitz in the max norm); gradients stay aligned."""
    g = torch.Generator().manual_seed(1)
    n, h, v = 21, 48, 203
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    y = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)
    out = {}
    for impl, use_fp8 in (("reference", False), ("chunked", True)):
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, _ = adapter.opd_token_terms(hh, ww, y, impl=impl, fp8=use_fp8, chunk_size=8)
        (lp * up).sum().backward()
        out[impl] = (lp.detach(), hh.grad, ww.grad)
    logit_bound = (BOUND * (hidden.abs() @ weight.abs().t())).max()
    dlogp = (out["chunked"][0] - out["reference"][0]).abs().max()
    assert dlogp <= 2 * logit_bound
    assert dlogp < 0.5 * logit_bound  # errors partly cancel; a systematic scale error would not
    for got, ref in zip(out["chunked"][1:], out["reference"][1:]):
        rel = (got - ref).norm() / ref.norm()
        assert rel < 0.1, rel  # three FP8 GEMMs each ~2^-5 typical relative error
