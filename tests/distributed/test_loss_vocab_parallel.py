"""The fused LM-head + OPD token terms at TP=2 (gloo, vocabulary split 19 + 18 rows) equals TP=1, for every impl.

Each rank holds its weight shard and the replicated hidden states (wrapped in ``copy_to_tp_region`` so the
hidden gradient is summed over the group, as Megatron's column-parallel input does). Compared with the
single-process reference: logprobs, top-K KL, the hidden gradient and each rank's weight-gradient shard, for
the student and teacher top-K strategies; and the loss the train step builds from the terms
(``reference.opd_loss``) with its gradients. Tolerance: fp32 throughout, atol 2e-5 / rtol 1e-5 (summation order differs across shards and
chunks; see tests/unit/test_loss_adapter.py).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.loss import adapter
from megatron_opd.loss.reference import opd_loss
from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

N, H, V, K, CHUNK = 11, 9, 37, 5, 4
SPLIT = [0, 19, V]
IMPLS = ("reference", "chunked", "triton")
STRATEGIES = ("student", "teacher")
TOL = dict(atol=2e-5, rtol=1e-5)


def _inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    y = torch.randint(0, V, (N,), generator=g)
    teacher = torch.log_softmax(torch.randn(N, V, generator=g), -1)
    teacher_ids = torch.topk(teacher, K).indices
    student_ids = torch.topk(hidden @ weight.t(), K).indices
    up_logp, up_kl = torch.randn(N, generator=g), torch.randn(N, generator=g)
    adv = torch.randn(1, N, generator=g)
    mask = torch.rand(1, N, generator=g) > 0.2
    return hidden, weight, y, teacher, teacher_ids, student_ids, up_logp, up_kl, adv, mask


def _terms(impl, strategy, hidden, weight, vocab_start, tp_group):
    _, _, y, teacher, tid, sid, up_logp, up_kl, adv, mask = _inputs()
    ids = sid if strategy == "student" else tid
    kw = dict(topk=K) if strategy == "student" else dict(topk_ids=tid)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, kl = adapter.opd_token_terms(
        adapter.copy_to_tp_region(h, tp_group), w, y, teacher_topk_logprobs=torch.gather(teacher, -1, ids),
        vocab_start=vocab_start, tp_group=tp_group, impl=impl, chunk_size=CHUNK, **kw,
    )  # fmt: skip
    ((lp * up_logp).sum() + (kl * up_kl).sum()).backward()
    return {"lp": lp.detach(), "kl": kl.detach(), "gh": h.grad, "gw": w.grad}


def _loss(impl, hidden, weight, vocab_start, tp_group):
    """The train step's composition: ``reference.opd_loss`` on the fused terms, then backward."""
    _, _, y, teacher, tid, _, _, _, adv, mask = _inputs()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, kl = adapter.opd_token_terms(
        adapter.copy_to_tp_region(h, tp_group), w, y, topk_ids=tid,
        teacher_topk_logprobs=torch.gather(teacher, -1, tid), vocab_start=vocab_start, tp_group=tp_group,
        impl=impl, chunk_size=CHUNK,
    )  # fmt: skip
    loss = opd_loss(lp.view(1, N), adv, mask, topk_kl=kl.view(1, N), topk_kl_coef=0.5)
    loss.backward()
    return {"loss": loss.detach(), "lp": lp.detach(), "gh": h.grad, "gw": w.grad}


def _worker(rank, world):
    import torch.distributed as dist

    hidden, weight = _inputs()[:2]
    lo, hi = SPLIT[rank], SPLIT[rank + 1]
    shard = weight[lo:hi].clone()
    group = dist.group.WORLD
    out = {}
    for impl in IMPLS:
        for strategy in STRATEGIES:
            out[f"{impl}/{strategy}"] = _terms(impl, strategy, hidden, shard, lo, group)
        out[f"{impl}/loss"] = _loss(impl, hidden, shard, lo, group)
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_on_ranks(_worker, 2)  # one launch for every case: process starts dominate the cost


def _check(tp1, tp2, key):
    for name, ref in tp1.items():
        for rank, res in enumerate(tp2):
            got = res[key][name]
            if name == "gw":  # each rank holds the gradient of its own weight rows
                ref_r = ref[SPLIT[rank] : SPLIT[rank + 1]]
                torch.testing.assert_close(got, ref_r, **TOL, msg=f"{key} {name} rank {rank}")
            else:
                torch.testing.assert_close(got, ref, **TOL, msg=f"{key} {name} rank {rank}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_terms_tp2_equals_tp1(impl, strategy, tp2):
    hidden, weight = _inputs()[:2]
    tp1 = _terms("reference", strategy, hidden, weight, 0, None)
    assert tp1["kl"].abs().max() > 1e-3
    _check(tp1, tp2, f"{impl}/{strategy}")


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_from_terms_tp2_equals_tp1(impl, tp2):
    hidden, weight = _inputs()[:2]
    _check(_loss("reference", hidden, weight, 0, None), tp2, f"{impl}/loss")
