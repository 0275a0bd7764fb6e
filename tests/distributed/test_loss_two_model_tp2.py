"""The two-model loss terms at TP=2 (gloo, vocabulary split 19 + 18 rows) equal TP=1, for every impl (Triton
through its interpreter on CPU).

Each rank holds its shard of both LM heads (the same ids) and the replicated hidden states of both models (the
student's wrapped in ``copy_to_tp_region`` so its gradient is summed over the group). Compared with the
single-process reference: log p_S(y), log p_T(y), the top-K ids (student and teacher strategies), the top-K and
full-vocabulary reverse KL, the student's hidden gradient and each rank's weight-gradient shard; and one model's
scores (``model_scores``: log p(y), its own top-K and log p at them) with rank 1 holding padding rows only. Tolerance: fp32,
atol 2e-5 / rtol 1e-5 (summation order differs across shards, chunks and tiles).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.loss import adapter, two_model
from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

N, HS, HT, V, K = 11, 9, 7, 37, 5
SPLIT = [0, 19, V]
TOL = dict(atol=2e-5, rtol=1e-5)
REAL = 17  # with vocab_size=REAL, rows 17..36 are embedding padding: rank 1 holds padding only
IMPLS = ("reference", "chunked", "triton")
KEYS = ("logp", "teacher_logp", "topk_kl", "full_kl", "gh", "gw")


def _inputs():
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(N, HS, generator=g), torch.randn(V, HS, generator=g) * 0.7
    ht, wt = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.7
    y = torch.randint(0, V, (N,), generator=g)
    ups = [torch.randn(N, generator=g) for _ in range(3)]
    return hs, ws, ht, wt, y, ups


def _terms(impl, strategy, lo, hi, tp_group, vocab_size=None):
    hs, ws, ht, wt, y, ups = _inputs()
    y = y % vocab_size if vocab_size else y  # sampled tokens are real ids
    h = hs.clone().requires_grad_(True)
    w = ws[lo:hi].clone().requires_grad_(True)
    out = two_model.two_model_terms(
        adapter.copy_to_tp_region(h, tp_group), w, ht, wt[lo:hi].clone(), y, topk=K, strategy=strategy,
        full_kl=True, vocab_start=lo, tp_group=tp_group, impl=impl, chunk_size=4, tile=6, vocab_size=vocab_size,
    )  # fmt: skip
    (
        (out["logp"] * ups[0]).sum() + (out["topk_kl"] * ups[1]).sum() + (out["full_kl"] * ups[2]).sum()
    ).backward()
    res = {k: out[k].detach() for k in ("logp", "teacher_logp", "topk_kl", "full_kl", "ids")}
    res.update(gh=h.grad, gw=w.grad)
    return res


def _worker(rank, world):
    import torch.distributed as dist

    lo, hi = SPLIT[rank], SPLIT[rank + 1]
    out = {
        f"{impl}/{s}": _terms(impl, s, lo, hi, dist.group.WORLD)
        for impl in IMPLS
        for s in ("student", "teacher")
    }
    for impl in IMPLS:
        out[f"pad/{impl}"] = _terms(impl, "student", lo, hi, dist.group.WORLD, vocab_size=REAL)
    for impl in ("chunked", "triton"):
        out[f"scores/{impl}"] = _scores(impl, lo, hi, dist.group.WORLD)
    return out


def _scores(impl, lo, hi, tp_group):
    """The teacher's own top-K scores (``two_model.model_scores``) from its shard, padding rows past REAL."""
    _, _, ht, wt, y, _ = _inputs()
    return two_model.model_scores(
        ht, wt[lo:hi], y % REAL, topk=K, vocab_start=lo, tp_group=tp_group, impl=impl, chunk_size=4, tile=6,
        vocab_size=REAL,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tp2():
    return run_on_ranks(_worker, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("strategy", ["student", "teacher"])
def test_two_model_terms_tp2_equal_tp1(impl, strategy, tp2):
    tp1 = _terms("reference", strategy, 0, V, None)
    assert tp1["full_kl"].min() > 1e-2
    for rank, res in enumerate(tp2):
        got = res[f"{impl}/{strategy}"]
        assert torch.equal(got["ids"], tp1["ids"]), f"rank {rank}"
        for key in KEYS:
            ref = tp1[key][SPLIT[rank] : SPLIT[rank + 1]] if key == "gw" else tp1[key]
            torch.testing.assert_close(got[key], ref, **TOL, msg=f"{impl}/{strategy} {key} rank {rank}")


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_rows_stay_out_of_the_softmax_even_on_a_padding_only_rank(impl, tp2):
    tp1 = _terms("reference", "student", 0, REAL, None, vocab_size=REAL)  # the unpadded vocabulary
    for rank, res in enumerate(tp2):
        got = res[f"pad/{impl}"]
        assert torch.equal(got["ids"], tp1["ids"]), f"rank {rank}"
        for key in KEYS:
            if key == "gw":
                lo, hi = SPLIT[rank], SPLIT[rank + 1]
                ref = torch.zeros(hi - lo, HS)
                ref[: max(0, min(REAL, hi) - lo)] = tp1["gw"][lo:REAL]
            else:
                ref = tp1[key]
            torch.testing.assert_close(got[key], ref, **TOL, msg=f"pad {impl} {key} rank {rank}")


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_model_scores_tp2_equal_tp1(impl, tp2):
    tp1 = _scores("chunked", 0, V, None)
    for rank, res in enumerate(tp2):
        got = res[f"scores/{impl}"]
        assert torch.equal(got[1], tp1[1]), f"rank {rank}"
        torch.testing.assert_close(got[0], tp1[0], **TOL, msg=f"{impl} logp rank {rank}")
        torch.testing.assert_close(got[2], tp1[2], **TOL, msg=f"{impl} top-K logp rank {rank}")
