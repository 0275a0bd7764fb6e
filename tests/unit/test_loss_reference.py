"""The reference loss against first-principles formulas written out here with plain autograd."""

import pytest
import torch

from megatron_opd.algorithms.advantage import opd_advantages
from megatron_opd.loss import reference as R
from megatron_opd.loss.metrics import distillation_metrics, position_bucket_means


def _logits(n=7, v=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, v, generator=g)).requires_grad_(True), torch.randint(0, v, (n,), generator=g)


def test_token_logprobs_is_log_softmax_gather():
    z, y = _logits()
    torch.testing.assert_close(R.token_logprobs(z, y), torch.log_softmax(z, -1)[torch.arange(7), y])


def test_token_logprobs_is_stable_for_huge_logits():
    z = torch.tensor([[1e4, 0.0, -1e4]])
    assert R.token_logprobs(z, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(R.token_logprobs(z, torch.tensor([2]))).all()


def test_topk_ids_and_logprobs_at():
    z, _ = _logits()
    ids = R.topk_ids(z, 4)
    assert torch.equal(ids, torch.topk(z, 4).indices)
    torch.testing.assert_close(R.logprobs_at(z, ids), torch.gather(torch.log_softmax(z, -1), -1, ids))


def test_topk_ids_breaks_ties_by_lower_id():
    z = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]])
    assert R.topk_ids(z, 2).tolist() == [[1, 2]]


def test_entropy():
    z, _ = _logits()
    p = torch.softmax(z, -1)
    torch.testing.assert_close(R.entropy(z), -(p * torch.log(p)).sum(-1))


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_reverse_kl_formula(renormalize):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    ids = R.topk_ids(zs, 16)
    ls, lt = (
        torch.gather(torch.log_softmax(zs, -1), -1, ids),
        torch.gather(torch.log_softmax(zt, -1), -1, ids),
    )
    got = R.topk_reverse_kl(ls, lt, renormalize)
    if renormalize:
        ps, pt = torch.softmax(ls, -1), torch.softmax(lt, -1)
        expect = (ps * (ps.log() - pt.log())).sum(-1)
        assert (got >= -1e-6).all()
    else:
        expect = (ls.exp() * (ls - lt)).sum(-1)
    torch.testing.assert_close(got, expect)
    # with K = V and renormalisation the top-K KL is the full reverse KL
    full_ids = torch.arange(30).expand(5, 30)
    fs, ft = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    torch.testing.assert_close(
        R.topk_reverse_kl(torch.gather(fs, -1, full_ids), torch.gather(ft, -1, full_ids)),
        torch.nn.functional.kl_div(ft, fs, log_target=True, reduction="none").sum(-1),
    )


def test_topk_kl_gradient_goes_to_the_student_only():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    R.topk_reverse_kl(s, t).sum().backward()
    assert s.grad is not None and t.grad is None


def test_policy_gradient_gradient_is_minus_advantage_times_score():
    """d loss / d z = -(A / N) * d log p(y) / d z = -(A / N) * (onehot(y) - softmax(z)) for token_mean."""
    z, y = _logits(n=6, v=9)
    adv = torch.randn(6)
    mask = torch.tensor([True, True, False, True, True, True])
    logp = R.token_logprobs(z, y)
    loss = R.opd_loss(logp[None], adv[None], mask[None])
    loss.backward()
    onehot = torch.nn.functional.one_hot(y, 9).float()
    expect = -(adv * mask / mask.sum())[:, None] * (onehot - torch.softmax(z.detach(), -1))
    torch.testing.assert_close(z.grad, expect)


def test_normalization_modes():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, True], [True, False, False]])
    assert R.normalize(x, m, "token_mean").item() == pytest.approx(10 / 4)
    assert R.normalize(x, m, "sequence_mean").item() == pytest.approx((2 + 4) / 2)
    assert R.normalize(x, m, "constant", constant=8.0).item() == pytest.approx(10 / 8)
    # a piece of a larger batch divides by the global count
    assert R.normalize(x, m, "token_mean", num_tokens=20).item() == pytest.approx(0.5)
    assert R.normalize(x, m, "sequence_mean", num_sequences=6).item() == pytest.approx(1.0)
    assert R.normalize(x, torch.zeros_like(m), "token_mean").item() == 0.0
    with pytest.raises(ValueError, match="unknown normalization"):
        R.normalize(x, m, "bogus")  # type: ignore[arg-type]


def test_opd_loss_combines_terms_and_masks_outside_window():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 7.0]])
    kl = torch.tensor([[0.2, 0.4, 99.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = R.opd_loss(lp, adv, mask, topk_kl=kl, pg_coef=1.0, topk_kl_coef=0.5)
    expect = ((0.5 * 1.0 + -1.0 * 2.0) + 0.5 * (0.2 + 0.4)) / 2
    assert loss.item() == pytest.approx(expect)
    loss.backward()
    assert lp.grad[0, 2] == 0 and kl.grad[0, 2] == 0


def test_opd_token_terms_from_logits_strategies():
    z, y = _logits(n=5, v=40, seed=3)
    zt = torch.randn(5, 40)
    # student strategy: ids chosen from the student's logits
    lp, kl, ids = R.opd_token_terms_from_logits(z, y, topk=16, teacher_topk_logprobs=None)
    assert kl is None and ids.shape == (5, 16)
    t_at = torch.gather(torch.log_softmax(zt, -1), -1, ids)
    lp, kl, ids2 = R.opd_token_terms_from_logits(z, y, topk=16, teacher_topk_logprobs=t_at)
    assert torch.equal(ids, ids2) and kl.shape == (5,)
    # teacher strategy: ids given
    tid = torch.topk(zt, 16).indices
    _, kl_t, ids3 = R.opd_token_terms_from_logits(
        z, y, topk_ids_given=tid, teacher_topk_logprobs=torch.gather(torch.log_softmax(zt, -1), -1, tid)
    )
    assert torch.equal(ids3, tid) and not torch.allclose(kl, kl_t)


def test_first_order_step_raises_teacher_agreement():
    """One small gradient step on the token-level OPD loss moves the student's sampled-token logprobs towards
    the teacher's: the sum of r_t decreases in magnitude in expectation. Checked on a fixed toy."""
    torch.manual_seed(0)
    z = torch.randn(64, 5, requires_grad=True)
    zt = torch.randn(64, 5)
    y = torch.distributions.Categorical(logits=z.detach()).sample()
    mask = torch.ones(1, 64, dtype=torch.bool)
    lp = R.token_logprobs(z, y)[None]
    tl = R.token_logprobs(zt, y)[None]
    adv = opd_advantages(tl, lp, mask, 0.0)
    R.opd_loss(lp, adv, mask).backward()
    kl = torch.nn.functional.kl_div
    before = kl(torch.log_softmax(zt, -1), torch.log_softmax(z, -1), log_target=True, reduction="sum")
    with torch.no_grad():
        z2 = z - 5.0 * z.grad
    after = kl(torch.log_softmax(zt, -1), torch.log_softmax(z2, -1), log_target=True, reduction="sum")
    assert after < before


def test_metrics_by_position_bucket():
    v = torch.arange(10, dtype=torch.float32).expand(2, 10)
    m = torch.ones(2, 10, dtype=torch.bool)
    m[1, 5:] = False
    assert position_bucket_means(v, m, max_length=10, num_buckets=2) == [2.0, 7.0]
    assert position_bucket_means(v[:, :4], m[:, :4], max_length=20, num_buckets=4)[1:] == [
        float("nan")
    ] * 3 or all(x != x for x in position_bucket_means(v[:, :4], m[:, :4], 20, 4)[1:])
    out = distillation_metrics(v, m, topk_kl=v, entropy=v, max_length=10, num_buckets=2)
    assert out["opd/log_ratio_mean"] == pytest.approx((45 + 10) / 15)
    assert out["opd_by_position/topk_kl_b01"] == 7.0
    assert out["opd_by_position/kl_b01"] == -7.0 and out["opd_by_position/entropy_b00"] == 2.0
    assert out["opd/tokens"] == 15
