"""The adapter's fused paths (chunked torch, Triton under TRITON_INTERPRET) equal the reference path.

Checked per case: the per-token logprobs, the top-K reverse KL, and the gradients on hidden AND weight from
random upstream gradients on both outputs; and the loss the train step builds from the terms
(``reference.opd_loss``) with its gradients, for every normalisation. Shapes are odd and chunk sizes do not divide N.

Tolerances, (input dtype, what) -> (atol, rtol), and why:
- float32 outputs and gradients: (2e-5, 1e-5). Both paths compute the same fp32 formulas; only summation
  order differs (chunked GEMM blocking, online vs two-pass log-sum-exp, scatter vs autograd accumulation).
  Observed differences are ~1e-6 at these magnitudes (|logit| <~ 10).
- bfloat16 outputs: (2e-5, 1e-5). On CPU both paths upcast the bf16 inputs exactly and run fp32 math, so the
  fp32 outputs agree as closely as for float32 inputs.
- bfloat16 gradients: (1e-5, 1e-2). The fp32 gradients agree to ~1e-6 and are then each rounded to bf16,
  whose spacing is 2^-7 ~ 7.8e-3 relative, so the two may land one bf16 step apart.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.loss import adapter
from megatron_opd.loss.reference import opd_loss

TOL = {
    (torch.float32, "out"): (2e-5, 1e-5),
    (torch.float32, "grad"): (2e-5, 1e-5),
    (torch.bfloat16, "out"): (2e-5, 1e-5),
    (torch.bfloat16, "grad"): (1e-5, 1e-2),
}


def _case(n: int, h: int, v: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    teacher_ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    teacher_lp = torch.log_softmax(torch.randn(n, v, generator=g), -1)
    up_logp, up_kl = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return hidden, weight, targets, teacher_ids, teacher_lp, up_logp, up_kl


def _run(impl, hidden, weight, targets, kw, up_logp, up_kl, chunk_size):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, kl = adapter.opd_token_terms(h, w, targets, impl=impl, chunk_size=chunk_size, **kw)
    total = (logp * up_logp).sum() + (0 if kl is None else (kl * up_kl).sum())
    total.backward()
    return logp.detach(), None if kl is None else kl.detach(), h.grad, w.grad


def _kw(mode, k, hidden, weight, teacher_ids, teacher_lp, renormalize):
    if mode == "none":
        return {}
    if mode == "teacher":
        ids = teacher_ids
        kw = dict(topk_ids=ids)
    else:
        # Student top-K: the path chooses the ids itself; the teacher's values must be at those same ids, so
        # look them up at the student's top-K of the fp32 logits (the trainer has them from an earlier pass).
        ids = torch.topk(hidden.float() @ weight.float().t(), k).indices
        kw = dict(topk=k)
    return dict(kw, teacher_topk_logprobs=torch.gather(teacher_lp, -1, ids), renormalize=renormalize)


def _assert_close(got, ref, dtype, what):
    atol, rtol = TOL[(dtype, what)]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


CASES = [  # (N, H, V, K, chunk): odd, chunk not dividing N, one single-token case
    (1, 7, 11, 3, 4),
    (19, 13, 157, 4, 5),
    (23, 32, 299, 16, 8),
]


def _check(impl, n, h, v, k, chunk, dtype, mode, renormalize):
    hidden, weight, targets, tid, tlp, up_logp, up_kl = _case(n, h, v, k, dtype)
    kw = _kw(mode, k, hidden, weight, tid, tlp, renormalize)
    ref = _run("reference", hidden, weight, targets, kw, up_logp, up_kl, chunk)
    got = _run(impl, hidden, weight, targets, kw, up_logp, up_kl, chunk)
    assert (got[1] is None) == (ref[1] is None) == (mode == "none")
    for what, a, b in zip(("out", "out", "grad", "grad"), got, ref):
        if b is not None:
            _assert_close(a, b, dtype, what)
    assert got[2].dtype == hidden.dtype and got[3].dtype == weight.dtype
    if mode != "none":
        assert got[1].abs().max() > 1e-3  # a non-trivial KL, so the comparison above means something


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode,renormalize", [("none", True), ("student", True), ("teacher", False)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}_H{}_V{}_K{}_c{}".format(*c))
def test_chunked_equals_reference(case, mode, renormalize, dtype):
    _check("chunked", *case, dtype, mode, renormalize)


@pytest.mark.parametrize(
    "case,mode,renormalize,dtype",
    [
        (CASES[1], "student", True, torch.float32),
        (CASES[2], "teacher", False, torch.bfloat16),
    ],
    ids=["N19_student_fp32", "N23_teacher_bf16"],
)
def test_triton_equals_reference(case, mode, renormalize, dtype):
    _check("triton", *case, dtype, mode, renormalize)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("normalization", ["token_mean", "sequence_mean", "constant"])
def test_loss_from_fused_terms_equals_reference_opd_loss(impl, normalization):
    """What the train step computes: ``reference.opd_loss`` on ``opd_token_terms``, fused path vs reference."""
    b, t, h, v, k = 3, 7, 13, 157, 4
    hidden, weight, targets, tid, tlp, _, _ = _case(b * t, h, v, k, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    adv = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    teacher = torch.gather(tlp, -1, tid)
    grads, losses, logps = [], [], []
    for which in ("reference", impl):
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, kl = adapter.opd_token_terms(
            hh, ww, targets, topk_ids=tid, teacher_topk_logprobs=teacher, impl=which, chunk_size=5
        )
        loss = opd_loss(
            lp.view(b, t), adv, mask, topk_kl=kl.view(b, t), pg_coef=0.9, topk_kl_coef=0.4,
            normalization=normalization, constant=11.0,
        )  # fmt: skip
        (2.5 * loss).backward()  # a non-unit upstream gradient reaches the fused backward scaled
        grads.append((hh.grad, ww.grad))
        losses.append(loss.detach())
        logps.append(lp.detach().reshape(b, t))
    torch.testing.assert_close(losses[1], losses[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logps[1], logps[0], atol=2e-5, rtol=1e-5)
    for got, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_chunk_size_does_not_change_results():
    hidden, weight, targets, tid, tlp, up_logp, up_kl = _case(19, 13, 157, 4, torch.float32, seed=5)
    kw = dict(topk_ids=tid, teacher_topk_logprobs=torch.gather(tlp, -1, tid))
    a = _run("chunked", hidden, weight, targets, kw, up_logp, up_kl, 1)
    b = _run("chunked", hidden, weight, targets, kw, up_logp, up_kl, 1000)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


def test_resolve_impl_and_input_checks():
    assert adapter.resolve_impl("auto", torch.device("cpu")) == "chunked"
    assert adapter.resolve_impl("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="unknown loss impl"):
        adapter.resolve_impl("fast", torch.device("cpu"))  # type: ignore[arg-type]
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="weight"):
        adapter.opd_token_terms(h, torch.randn(10, 9), y)
    with pytest.raises(ValueError, match="targets"):
        adapter.opd_token_terms(h, w, y[:3])
    with pytest.raises(ValueError, match="fp8"):
        adapter.opd_token_terms(h, w, y, impl="reference", fp8=True)
    assert adapter.copy_to_tp_region(h, None) is h


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, targets, *_, up_logp, _ = _case(9, 13, 157, 4, torch.float32, seed=6)
    grads = []
    for impl in ("reference", "chunked"):
        h = hidden.clone().requires_grad_(True)
        lp, _ = adapter.opd_token_terms(h, weight, targets, impl=impl, chunk_size=4)
        (lp * up_logp).sum().backward()
        grads.append(h.grad)
    assert weight.grad is None
    torch.testing.assert_close(grads[1], grads[0], atol=2e-5, rtol=1e-5)
