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


@pytest.mark.parametrize("fp8_forward", [False, True], ids=["grads", "all"])
def test_fp8_chunked_terms_close_to_fp32_reference(fp8_forward):
    """fp8 grads only: log p is the fp32 one. fp8 logits too: log p error <= 2 * max logit error (log-sum-exp
    is 1-Lipschitz in the max norm). Either way the gradients stay within ~10% in norm."""
    g = torch.Generator().manual_seed(1)
    n, h, v = 21, 48, 203
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    y = torch.randint(0, v, (n,), generator=g)
    up = torch.randn(n, generator=g)
    out = {}
    for impl, use_fp8 in (("reference", False), ("chunked", True)):
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, _ = adapter.opd_token_terms(
            hh, ww, y, impl=impl, fp8=use_fp8, fp8_forward=use_fp8 and fp8_forward, chunk_size=8
        )
        (lp * up).sum().backward()
        out[impl] = (lp.detach(), hh.grad, ww.grad)
    dlogp = (out["chunked"][0] - out["reference"][0]).abs().max()
    if fp8_forward:
        logit_bound = (BOUND * (hidden.abs() @ weight.abs().t())).max()
        assert 0 < dlogp <= 2 * logit_bound
        assert dlogp < 0.5 * logit_bound  # errors partly cancel; a systematic scale error would not
    else:
        assert dlogp < 1e-5  # same fp32 logits as the reference (see tests/unit/test_loss_adapter.py)
    for got, ref in zip(out["chunked"][1:], out["reference"][1:]):
        rel = (got - ref).norm() / ref.norm()
        assert 1e-4 < rel < 0.1, rel  # FP8 did run (not bit-equal), ~2^-5 typical relative error per GEMM


def test_fp8_forward_needs_fp8():
    h, w, y = torch.randn(4, 16), torch.randn(16, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="fp8_forward"):
        adapter.opd_token_terms(h, w, y, impl="chunked", fp8_forward=True)


def test_quantized_operand_gives_the_same_product():
    """A pre-quantised right operand (``quantize_operand``) is bit-identical to quantising it in the call."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(9, 40, generator=g), torch.randn(33, 40, generator=g)
    for scaling in ("row", "tensor"):
        qb = fp8.quantize_operand(b, scaling)
        assert torch.equal(fp8.matmul_nt(a, qb, scaling), fp8.matmul_nt(a, b, scaling))
    with pytest.raises(ValueError, match="scaling"):
        fp8.matmul_nt(a, fp8.quantize_operand(b, "row"), "tensor")
    with pytest.raises(ValueError, match="last dimensions"):
        fp8.matmul_nt(a[:, :8], fp8.quantize_operand(b))


@pytest.mark.parametrize("fp8_forward", [False, True], ids=["grads", "all"])
def test_lm_head_weight_quantised_once_per_pass(monkeypatch, fp8_forward):
    """The LM-head weight W [V, H] is quantised once per pass over the chunks, not once per chunk: counted
    through ``fp8.quantize`` by the operand's (padded) shape, W [208, 48] and W^T [48, 208] here (5 chunks)."""
    g = torch.Generator().manual_seed(3)
    n, h, v, chunk = 37, 48, 203, 8
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    shapes: list[tuple[int, ...]] = []
    orig = fp8.quantize
    monkeypatch.setattr(
        fp8, "quantize", lambda x, scaling="row": shapes.append(tuple(x.shape)) or orig(x, scaling)
    )
    kw = dict(impl="chunked", fp8=True, fp8_forward=fp8_forward, chunk_size=chunk)
    lp, _ = adapter.opd_token_terms(hidden, weight, y, **kw)
    forward_w = shapes.count((208, 48))
    lp.sum().backward()
    w, wt = shapes.count((208, 48)), shapes.count((48, 208))
    # dz^T [203, 8] -> [208, 16] for d W is per chunk by nature: it shows that all 5 chunks ran in FP8.
    assert shapes.count((208, 16)) == 5
    # forward: W once for the logits ('all'); backward: W again for the recomputed logits, W^T once.
    assert forward_w == (1 if fp8_forward else 0)
    assert (w, wt) == ((2, 1) if fp8_forward else (0, 1))
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
