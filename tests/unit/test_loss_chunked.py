"""The per-chunk math of ``chunked.py`` against autograd through ``reference.py`` on the same logits.

This isolates the analytic logits gradient (module doc of chunked.py) from the GEMMs: for a logits block z,
``logits_grad_`` must equal d/dz of (g_logp . log p(y) + g_kl . KL) computed by autograd through the reference.
Tolerance: fp32 both sides, atol 1e-6 / rtol 1e-5 (the same fp32 formulas, different operation order; the
gradient entries are <= 1 in magnitude here).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.loss import chunked
from megatron_opd.loss.reference import opd_token_terms_from_logits


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_logits_grad_matches_autograd_of_reference(backend, renormalize):
    g = torch.Generator().manual_seed(0)
    c, v, k = 7, 53, 5
    z = 3 * torch.randn(c, v, generator=g)
    y = torch.randint(0, v, (c,), generator=g)
    y[0] = torch.topk(z[0], k).indices[2]  # the target inside the top-K set: both one-hots hit one column
    teacher = torch.log_softmax(torch.randn(c, v, generator=g), -1)
    ids = torch.topk(z, k).indices
    t_at = torch.gather(teacher, -1, ids)
    g_logp, g_kl = torch.randn(c, generator=g), torch.randn(c, generator=g)

    zl = z.clone().requires_grad_(True)
    lp, kl, _ = opd_token_terms_from_logits(
        zl, y, topk=k, teacher_topk_logprobs=t_at, renormalize=renormalize
    )
    ((lp * g_logp).sum() + (kl * g_kl).sum()).backward()

    terms = chunked.chunk_forward(
        z, y, None, t_at, topk=k, renormalize=renormalize, vocab_start=0, tp_group=None, backend=backend
    )
    torch.testing.assert_close(terms.logp, lp.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms.kl, kl.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(terms.ids, ids)
    g_s = chunked.kl_grad(terms.s, t_at, renormalize, g_kl)
    dz = chunked.logits_grad_(z.clone(), terms.lse, y, g_logp, terms.ids, g_s, vocab_start=0, backend=backend)
    torch.testing.assert_close(dz, zl.grad, atol=1e-6, rtol=1e-5)


def test_logits_grad_on_a_vocab_shard_keeps_only_local_one_hots():
    """A rank holding ids [20, 53) gets the shard of the full gradient: foreign one-hots are dropped."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 53, generator=g)
    y = torch.tensor([3, 25, 52, 19])  # two targets on the other shard
    g_logp = torch.randn(4, generator=g)
    lse = torch.logsumexp(z, -1)
    full = chunked.logits_grad_(z.clone(), lse, y, g_logp, None, None, vocab_start=0, backend="torch")
    shard = chunked.logits_grad_(
        z[:, 20:].clone(), lse, y, g_logp, None, None, vocab_start=20, backend="torch"
    )
    torch.testing.assert_close(shard, full[:, 20:], atol=1e-7, rtol=1e-6)


def test_chunks_cover_all_tokens_once():
    sl = chunked.chunks(23, 8)
    assert [(s.start, s.stop) for s in sl] == [(0, 8), (8, 16), (16, 23)]
    assert chunked.chunks(0, 8) == []


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_grad_in_bf16_is_the_fp32_gradient_rounded(backend):
    """out_dtype=bf16 (the CUDA path feeding tensor-core GEMMs): within two bf16 conversions of the fp32 dz
    (the dense part, then the one-hot add), each at most one bf16 step (2^-7 relative; the Triton interpreter
    truncates rather than rounds, see test_loss_triton_kernels.py)."""
    g = torch.Generator().manual_seed(2)
    z = 3 * torch.randn(6, 77, generator=g)
    y = torch.randint(0, 77, (6,), generator=g)
    g_logp, lse = torch.randn(6, generator=g), torch.logsumexp(z, -1)
    ref = chunked.logits_grad_(z.clone(), lse, y, g_logp, None, None, vocab_start=0, backend="torch")
    got = chunked.logits_grad_(
        z.clone(), lse, y, g_logp, None, None, vocab_start=0, backend=backend, out_dtype=torch.bfloat16
    )
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=1e-6, rtol=2 * 2**-7)
