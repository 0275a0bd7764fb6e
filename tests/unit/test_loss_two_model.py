"""The two-model (student + teacher LM heads) loss terms: the reference's full-vocabulary KL and the tiled path.

1. ``reference.full_reverse_kl`` equals sum_v p_S (log p_S - log p_T) computed independently
   (``torch.nn.functional.kl_div``), is >= 0, is 0 for identical models, and its autograd gradient equals the
   closed form p_S ((log p_S - log p_T) - KL) that ``two_model.py``'s backward applies.
2. ``two_model.two_model_terms`` (tiles) == the reference (impl='reference'), values and gradients to the
   student's hidden states and LM head, on odd shapes (N, V not multiples of chunk or tile, odd H, the
   teacher narrower than the student), both top-K strategies, renormalised or not, with the full KL.

Tolerances (dtype, atol, rtol), both sides computing in fp32:
- float32: 2e-5 / 1e-5. Same operands; the tiled path sums exp over tiles with running-max rescaling and the
  GEMMs per tile, so only the summation order differs (errors ~1e-6 on O(1) values).
- bfloat16 inputs: 5e-5 / 1e-5. On CPU both paths upcast the same bf16-rounded operands to fp32, so the rounding
  of the inputs is shared; the logits are larger (weights not scaled down), hence a slightly wider atol.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.loss import reference, two_model

N, HS, HT, V, K = 13, 9, 7, 37, 5
DTYPES = [(torch.float32, 2e-5, 1e-5), (torch.bfloat16, 5e-5, 1e-5)]


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, HS, generator=g).to(dtype)
    ws = (torch.randn(V, HS, generator=g) * 0.7).to(dtype)
    ht = torch.randn(N, HT, generator=g).to(dtype)
    wt = (torch.randn(V, HT, generator=g) * 0.7).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    ups = {k: torch.randn(N, generator=g) for k in ("logp", "topk_kl", "full_kl")}
    return hs, ws, ht, wt, y, ups


def _run(impl, strategy, renormalize, dtype, chunk=4, tile=6, full_kl=True, topk=K):
    hs, ws, ht, wt, y, ups = _inputs(dtype)
    h = hs.clone().requires_grad_(True)
    w = ws.clone().requires_grad_(True)
    out = two_model.two_model_terms(
        h, w, ht, wt, y, topk=topk, strategy=strategy, renormalize=renormalize, full_kl=full_kl, impl=impl,
        chunk_size=chunk, tile=tile,
    )  # fmt: skip
    total = sum((out[k] * u).sum() for k, u in ups.items() if out[k] is not None)
    total.backward()
    res = {k: v.detach() for k, v in out.items() if v is not None}
    res.update(gh=h.grad.float(), gw=w.grad.float())
    return res


def test_full_reverse_kl_is_the_kl_and_its_gradient_is_the_closed_form():
    g = torch.Generator().manual_seed(3)
    zs = (2 * torch.randn(6, 29, generator=g)).requires_grad_(True)
    zt = 2 * torch.randn(6, 29, generator=g)
    kl = reference.full_reverse_kl(zs, zt)
    ls, lt = torch.log_softmax(zs.detach(), -1), torch.log_softmax(zt, -1)
    want = torch.nn.functional.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl.detach(), want, atol=1e-6, rtol=1e-5)
    assert bool((kl > 0).all())
    up = torch.randn(6, generator=g)
    (kl * up).sum().backward()
    p = ls.exp()
    closed = p * ((ls - lt) - kl.detach().unsqueeze(-1)) * up.unsqueeze(-1)
    torch.testing.assert_close(zs.grad, closed, atol=1e-6, rtol=1e-5)
    same = reference.full_reverse_kl(zt, zt)
    assert float(same.abs().max()) < 1e-6


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("strategy", ["student", "teacher"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_tiled_equals_reference(dtype, atol, rtol, strategy, renormalize):
    ref = _run("reference", strategy, renormalize, dtype)
    got = _run("chunked", strategy, renormalize, dtype)
    assert ref["full_kl"].min() > 1e-2 and ref["topk_kl"].abs().max() > 1e-3  # the terms are not trivially 0
    assert torch.equal(got["ids"], ref["ids"])
    for key in ("logp", "teacher_logp", "topk_kl", "full_kl", "gh", "gw"):
        torch.testing.assert_close(got[key], ref[key], atol=atol, rtol=rtol, msg=key)
    assert got["gh"].dtype == torch.float32


@pytest.mark.parametrize("chunk,tile", [(1, 1), (13, 37), (5, 36), (100, 4096)])
def test_tiled_equals_reference_for_any_chunk_and_tile(chunk, tile):
    ref = _run("reference", "student", True, torch.float32)
    got = _run("chunked", "student", True, torch.float32, chunk=chunk, tile=tile)
    for key in ("logp", "teacher_logp", "topk_kl", "full_kl", "gh", "gw"):
        torch.testing.assert_close(got[key], ref[key], atol=2e-5, rtol=1e-5, msg=key)


def test_without_topk_and_full_kl_only_logprobs_are_returned():
    got = _run("chunked", "student", True, torch.float32, full_kl=False, topk=0)
    ref = _run("reference", "student", True, torch.float32, full_kl=False, topk=0)
    assert set(got) == {"logp", "teacher_logp", "gh", "gw"}
    for key in got:
        torch.testing.assert_close(got[key], ref[key], atol=2e-5, rtol=1e-5, msg=key)


def test_teacher_logprobs_are_the_teachers_own():
    hs, ws, ht, wt, y, _ = _inputs()
    out = two_model.two_model_terms(hs, ws, ht, wt, y, impl="chunked", chunk_size=4, tile=6)
    want = reference.token_logprobs(ht @ wt.t(), y)
    torch.testing.assert_close(out["teacher_logp"], want, atol=2e-5, rtol=1e-5)


def test_teacher_gets_no_gradient():
    hs, ws, ht, wt, y, _ = _inputs()
    ht.requires_grad_(True)
    wt.requires_grad_(True)
    out = two_model.two_model_terms(hs, ws, ht, wt, y, topk=K, full_kl=True, impl="chunked", tile=6)
    assert not out["teacher_logp"].requires_grad
    (out["full_kl"].sum() + out["topk_kl"].sum()).backward()
    assert ht.grad is None and wt.grad is None


def test_bad_shapes_name_the_problem():
    hs, ws, ht, wt, y, _ = _inputs()
    with pytest.raises(ValueError, match="same vocabulary rows"):
        two_model.two_model_terms(hs, ws, ht, wt[:-1], y)
    with pytest.raises(ValueError, match="same N"):
        two_model.two_model_terms(hs, ws, ht[:-1], wt, y)
    with pytest.raises(ValueError, match="strategy"):
        two_model.two_model_terms(hs, ws, ht, wt, y, topk=2, strategy="both")


def test_tile_topk_breaks_ties_like_the_reference():
    g = torch.Generator().manual_seed(5)
    z = torch.randint(-3, 4, (40, 23), generator=g).float()  # many exact ties
    z[0] = 0.0
    z[1, 5] = -0.5
    vals, idx = two_model.tile_topk(z, 6)
    want = reference.topk_ids(z, 6)
    assert torch.equal(idx, want)
    torch.testing.assert_close(vals, torch.gather(z, -1, want), atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_no_tokens_gives_empty_terms_and_zero_gradients(impl):
    h = torch.zeros(0, HS, requires_grad=True)
    w = torch.randn(V, HS, requires_grad=True)
    out = two_model.two_model_terms(
        h, w, torch.zeros(0, HT), torch.randn(V, HT), torch.zeros(0, dtype=torch.long), topk=K, full_kl=True,
        impl=impl,
    )  # fmt: skip
    assert out["logp"].shape == (0,) and out["full_kl"].shape == (0,)
    (out["logp"].sum() + out["topk_kl"].sum() + out["full_kl"].sum()).backward()
    assert float(w.grad.abs().sum()) == 0.0


def _scores_ref(h, w, y, ids, k, real=V):
    z = (h.float() @ w.float().t())[:, :real]
    at = ids if ids is not None else (reference.topk_ids(z, k) if k else None)
    return reference.token_logprobs(z, y), at, None if at is None else reference.logprobs_at(z, at)


@pytest.mark.parametrize("mode", ["given", "own", "token"])
@pytest.mark.parametrize("chunk,tile", [(4, 6), (13, 37), (1, 1)])
def test_model_scores_equal_the_reference(mode, chunk, tile, impl="chunked"):
    """``model_scores`` (a teacher's scores over tiles) == log p from the full logits; tolerance as above (fp32)."""
    hs, ws, ht, wt, y, _ = _inputs()
    given = (
        torch.randint(0, V, (N, K), generator=torch.Generator().manual_seed(7)) if mode == "given" else None
    )
    k = K if mode == "own" else 0
    got = two_model.model_scores(ht, wt, y, ids=given, topk=k, impl=impl, chunk_size=chunk, tile=tile)
    want = _scores_ref(ht, wt, y, given, k)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    if mode == "token":
        assert got[1] is None and got[2] is None
    else:
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=1e-5)


def test_model_scores_leave_padding_rows_out():
    hs, ws, ht, wt, y, _ = _inputs()
    real = 30
    y = y % real
    got = two_model.model_scores(ht, wt, y, topk=K, impl="chunked", tile=8, vocab_size=real)
    want = _scores_ref(ht, wt, y, None, K, real=real)
    assert torch.equal(got[1], want[1]) and int(got[1].max()) < real
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=1e-5)
