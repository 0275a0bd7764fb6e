"""The Triton path of the two-model loss (run by Triton's interpreter on CPU) and its FP8 gradient GEMMs.

1. The kernels alone: ``tile_stats_`` folded over tiles and inner blocks == torch's logsumexp of both models,
   sum_v exp(z_S - m_S)(z_S - z_T) and the logits at y (whichever tile holds y); ``tile_grad_`` == the closed
   form -c p_S + g_full p_S ((log p_S - log p_T) - KL).
2. ``two_model_terms(impl='triton')`` == the reference (impl='reference'), values and gradients, on the odd
   shapes of ``test_loss_two_model`` (N, V not multiples of chunk or tile, odd H, the teacher narrower), both
   top-K strategies, renormalised or not, fp32 and bf16 inputs, several chunk/tile sizes, no tokens.
3. ``model_scores(impl='triton')`` (one model's scores over tiles, the Triton logsumexp) == the reference.
4. ``fp8=True``: forward outputs equal the fp32 path's (the logits are not FP8), gradients within the e4m3 bound
   of ``test_loss_fp8`` and not bit-equal (FP8 did run); refused with impl 'reference'.

Tolerances (fp32 everywhere inside): values and gradients atol 2e-5 / rtol 1e-5 for fp32 inputs, atol 5e-5 for
bf16 inputs (as ``test_loss_two_model``: only the summation order differs, over tiles, inner blocks and the
gather of z at y from a GEMM tile instead of a dot product). Kernel-only checks: 1e-5 (one tile's reordering).
Shapes stay small: the interpreter runs a kernel at milliseconds per row.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.loss import reference, two_model
from megatron_opd.loss import two_model_triton as tt
from tests.unit.test_loss_two_model import HS, HT, K, V, _inputs, _run
from tests.unit.test_loss_two_model import test_model_scores_equal_the_reference as _scores_check

KEYS = ("logp", "teacher_logp", "topk_kl", "full_kl", "gh", "gw")


def _tile_pair(c=5, v=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs, zt = 3 * torch.randn(c, v, generator=g), 3 * torch.randn(c, v, generator=g)
    zs[0, -1] = 60.0  # the student's row max in the last tile's last block: earlier sums must be rescaled
    zt[1, 3] = -1e4
    return zs, zt


@pytest.mark.parametrize("tile,block_v", [(77, None), (20, 8), (7, 4)])
def test_tile_stats_is_both_logsumexps_the_kl_accumulator_and_z_at_y(tile, block_v):
    zs, zt = _tile_pair()
    c, v = zs.shape
    y = torch.tensor([76, 0, 19, 40, 8])
    st = tt.new_state(c, zs.device)
    for lo in range(0, v, tile):
        hi = min(lo + tile, v)
        tt.tile_stats_(
            zs[:, lo:hi].contiguous(), zt[:, lo:hi].contiguous(), st, y + 100, 100 + lo, True, block_v
        )
    lse_s, lse_t = st[0] + st[1].log(), st[3] + st[4].log()
    torch.testing.assert_close(lse_s, torch.logsumexp(zs, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_t, torch.logsumexp(zt, -1), atol=1e-5, rtol=1e-5)
    kl = st[2] / st[1] - lse_s + lse_t
    torch.testing.assert_close(kl, reference.full_reverse_kl(zs, zt), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st[5], zs.gather(1, y[:, None])[:, 0], atol=0, rtol=0)  # copied, not computed
    torch.testing.assert_close(st[6], zt.gather(1, y[:, None])[:, 0], atol=0, rtol=0)


def test_tile_stats_without_full_kl_leaves_the_accumulator_and_ignores_ids_outside():
    zs, zt = _tile_pair(c=3, v=10)
    st = tt.new_state(3, zs.device)
    tt.tile_stats_(zs, zt, st, torch.tensor([10, -1, 500]), 0, False)  # no y inside [0, 10)
    assert float(st[2].abs().max()) == 0.0 and float(st[5:].abs().max()) == 0.0
    torch.testing.assert_close(st[3] + st[4].log(), torch.logsumexp(zt, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("full", [False, True])
def test_tile_grad_is_the_closed_form(full):
    zs, zt = _tile_pair(seed=1)
    g = torch.Generator().manual_seed(2)
    c = torch.randn(5, generator=g)
    g_full = torch.randn(5, generator=g)
    lse_s, lse_t = torch.logsumexp(zs, -1), torch.logsumexp(zt, -1)
    kl = reference.full_reverse_kl(zs, zt)
    ls, lt = zs - lse_s[:, None], zt - lse_t[:, None]
    want = -c[:, None] * ls.exp()
    if full:
        want = want + g_full[:, None] * ls.exp() * ((ls - lt) - kl[:, None])
    z = zs.clone()
    args = (zt, lse_t, g_full, kl) if full else ()
    got = tt.tile_grad_(z, lse_s, c, *args, block_v=16)
    assert got.data_ptr() == z.data_ptr()  # in place: no second [C, t] block
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 2e-5, 1e-5), (torch.bfloat16, 5e-5, 1e-5)])
@pytest.mark.parametrize("strategy", ["student", "teacher"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_triton_equals_reference(dtype, atol, rtol, strategy, renormalize):
    ref = _run("reference", strategy, renormalize, dtype)
    got = _run("triton", strategy, renormalize, dtype)
    assert ref["full_kl"].min() > 1e-2 and ref["topk_kl"].abs().max() > 1e-3  # the terms are not trivially 0
    assert torch.equal(got["ids"], ref["ids"])
    for key in KEYS:
        torch.testing.assert_close(got[key], ref[key], atol=atol, rtol=rtol, msg=key)


@pytest.mark.parametrize("chunk,tile", [(1, 1), (13, 37), (5, 36)])
def test_triton_equals_reference_for_any_chunk_and_tile(chunk, tile):
    ref = _run("reference", "student", True, torch.float32)
    got = _run("triton", "student", True, torch.float32, chunk=chunk, tile=tile)
    for key in KEYS:
        torch.testing.assert_close(got[key], ref[key], atol=2e-5, rtol=1e-5, msg=key)


def test_triton_without_topk_and_full_kl():
    got = _run("triton", "student", True, torch.float32, full_kl=False, topk=0)
    ref = _run("reference", "student", True, torch.float32, full_kl=False, topk=0)
    assert set(got) == {"logp", "teacher_logp", "gh", "gw"}
    for key in got:
        torch.testing.assert_close(got[key], ref[key], atol=2e-5, rtol=1e-5, msg=key)


def test_triton_no_tokens_gives_empty_terms_and_zero_gradients():
    h = torch.zeros(0, HS, requires_grad=True)
    w = torch.randn(V, HS, requires_grad=True)
    out = two_model.two_model_terms(
        h, w, torch.zeros(0, HT), torch.randn(V, HT), torch.zeros(0, dtype=torch.long), topk=K, full_kl=True,
        impl="triton",
    )  # fmt: skip
    assert out["logp"].shape == (0,) and out["full_kl"].shape == (0,)
    (out["logp"].sum() + out["topk_kl"].sum() + out["full_kl"].sum()).backward()
    assert float(w.grad.abs().sum()) == 0.0


BOUND = (1 + 2**-4) ** 2 - 1  # e4m3 product error bound (test_loss_fp8's module doc)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_fp8_gradients_within_e4m3_bound_and_forward_unchanged(impl):
    hs, ws, ht, wt, y, ups = _inputs()
    outs = {}
    for use_fp8 in (False, True):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        out = two_model.two_model_terms(
            h, w, ht, wt, y, topk=K, full_kl=True, impl=impl, chunk_size=4, tile=6, fp8=use_fp8
        )
        sum((out[k] * ups[k]).sum() for k in ups).backward()
        outs[use_fp8] = (out, h.grad, w.grad)
    for key in ("logp", "teacher_logp", "topk_kl", "full_kl"):
        assert torch.equal(outs[True][0][key], outs[False][0][key]), key  # same fp32 logits in forward
    for got, ref in zip(outs[True][1:], outs[False][1:]):
        rel = (got - ref).norm() / ref.norm()
        assert 1e-4 < rel < 0.1, rel  # FP8 did run (not bit-equal), ~2^-5 typical relative error per GEMM


def test_fp8_is_refused_with_the_reference_impl():
    hs, ws, ht, wt, y, _ = _inputs()
    with pytest.raises(ValueError, match="fp8 is a property of the tiled paths"):
        two_model.two_model_terms(hs, ws, ht, wt, y, impl="reference", fp8=True)


@pytest.mark.parametrize("mode", ["given", "own"])
def test_model_scores_with_triton_equal_the_reference(mode):
    _scores_check(mode, 4, 6, impl="triton")
