"""The vocab-parallel reference loss at TP=2 (gloo) equals the single-rank result: loss and logit gradients."""

import pytest
import torch

from megatron_opd.loss import reference as R
from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

N, V, K = 9, 37, 5  # odd sizes: V splits unevenly into 19 + 18 rows


def _inputs():
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(N, V, generator=g)
    zt = 2 * torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    adv = torch.randn(N, generator=g)
    return z, zt, y, adv


def _loss(z, y, adv, zt_full, vocab_start, tp_group, strategy):
    tid = torch.topk(zt_full, K).indices if strategy == "teacher" else None
    lp, kl, ids = R.opd_token_terms_from_logits(
        z,
        y,
        topk=K if tid is None else 0,
        topk_ids_given=tid,
        vocab_start=vocab_start,
        tp_group=tp_group,
        teacher_topk_logprobs=None,
    )
    ids = ids if tid is None else tid
    t_at = torch.gather(torch.log_softmax(zt_full, -1), -1, ids)
    _, kl, _ = R.opd_token_terms_from_logits(
        z, y, topk_ids_given=ids, teacher_topk_logprobs=t_at, vocab_start=vocab_start, tp_group=tp_group
    )
    ent = R.entropy(z, tp_group)
    mask = torch.ones(1, N, dtype=torch.bool)
    loss = R.opd_loss(lp[None], adv[None], mask, topk_kl=kl[None], topk_kl_coef=0.7)
    return loss, lp, kl, ids, ent


STRATEGIES = ("student", "teacher")


def _worker(rank, world):
    import torch.distributed as dist

    z, zt, y, adv = _inputs()
    bounds = [0, 19, V]
    lo, hi = bounds[rank], bounds[rank + 1]
    results = {}
    for strategy in STRATEGIES:
        shard = z[:, lo:hi].clone().requires_grad_(True)
        loss, lp, kl, ids, ent = _loss(shard, y, adv, zt, lo, dist.group.WORLD, strategy)
        loss.backward()
        results[strategy] = {
            "loss": loss.detach(),
            "lp": lp.detach(),
            "kl": kl.detach(),
            "ids": ids,
            "ent": ent,
            "grad": shard.grad,
        }
    return results


@pytest.fixture(scope="module")
def tp2_results():
    return run_on_ranks(_worker, 2)  # one launch for both strategies: process starts are the cost here


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tp2_equals_tp1(strategy, tp2_results):
    z, zt, y, adv = _inputs()
    z1 = z.clone().requires_grad_(True)
    loss, lp, kl, ids, ent = _loss(z1, y, adv, zt, 0, None, strategy)
    loss.backward()
    out = [r[strategy] for r in tp2_results]
    # Both ranks hold the same reduced values. The sums over the vocabulary are split in two fp32 partial
    # sums, so results differ from the one-rank order by a few ulps: 1e-6 absolute on O(1) values.
    for r in out:
        torch.testing.assert_close(r["loss"], loss.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["lp"], lp.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["kl"], kl.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["ent"], ent, atol=1e-5, rtol=1e-6)
        assert torch.equal(r["ids"], ids)
    grad = torch.cat([out[0]["grad"], out[1]["grad"]], dim=-1)
    torch.testing.assert_close(grad, z1.grad, atol=1e-7, rtol=1e-6)
