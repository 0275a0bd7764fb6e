"""Advantages: the O(T) return-to-go equals the direct O(T^2) sum; Proposition 1 holds by Monte Carlo."""

import pytest
import torch

from megatron_opd.algorithms.advantage import discounted_returns, log_ratio, opd_advantages


def _direct(r: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. (5) written as the double sum: A_t = sum_{k >= t, k in mask} gamma^(k-t) r_k."""
    B, T = r.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                out[b, t] = sum((gamma ** (k - t)) * float(r[b, k]) for k in range(t, T) if mask[b, k])
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 0.99, 1.0])
def test_return_to_go_equals_the_direct_sum(gamma):
    g = torch.Generator().manual_seed(int(gamma * 100))
    r = torch.randn(4, 23, generator=g)
    mask = torch.rand(4, 23, generator=g) > 0.2
    mask[0] = True
    mask[3] = False
    got = discounted_returns(r, mask, gamma)
    # fp32 accumulation over <= 23 terms of O(1) values: 1e-5 absolute is ~10 ulps of the largest partial sum
    torch.testing.assert_close(got.double(), _direct(r, mask, gamma), atol=1e-5, rtol=1e-5)
    assert (got[~mask] == 0).all()


def test_token_level_is_the_log_ratio_and_respects_the_window():
    t = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    s = torch.tensor([[-1.5, -1.0, -0.5, -0.1]])
    mask = torch.tensor([[True, True, True, False]])  # position 3 is outside the horizon
    assert log_ratio(t, s, mask).tolist() == [[0.5, -1.0, 0.0, 0.0]]
    assert opd_advantages(t, s, mask, 0.0).tolist() == [[0.5, -1.0, 0.0, 0.0]]
    assert opd_advantages(t, s, mask, 1.0).tolist() == [[-0.5, -1.0, 0.0, 0.0]]


def test_advantages_are_detached():
    s = torch.randn(2, 5, requires_grad=True)
    a = opd_advantages(torch.randn(2, 5), s, torch.ones(2, 5, dtype=torch.bool), 0.5)
    assert not a.requires_grad


def test_long_sequences_are_fast_enough():
    # O(T) per sequence: 64 x 15360 with gamma = 0.99 (the loop case) stays well under a second or two.
    import time

    r = torch.randn(64, 15360)
    mask = torch.ones_like(r, dtype=torch.bool)
    t0 = time.perf_counter()
    a = discounted_returns(r, mask, 0.99)
    assert time.perf_counter() - t0 < 10.0
    assert torch.isfinite(a).all()


def test_proposition_1_noise_accumulation_by_monte_carlo():
    """MSE_t(A_seq - A*) = delta^2 * sum_{k=t}^T k^2 when sigma_k = delta * k and gamma = 1 (Eq. 9/18-21)."""
    T, delta, n = 20, 0.05, 200_000
    g = torch.Generator().manual_seed(0)
    r_star = torch.randn(T, generator=g).expand(n, T)
    k = torch.arange(1, T + 1, dtype=torch.float32)
    r = r_star + delta * k * torch.randn(n, T, generator=g)
    mask = torch.ones(n, T, dtype=torch.bool)
    err = discounted_returns(r, mask, 1.0).double() - discounted_returns(r_star, mask, 1.0).double()
    mse = (err**2).mean(0)
    ks = torch.arange(1, T + 1, dtype=torch.float64)
    theory = torch.tensor([delta**2 * (ks[t - 1 :] ** 2).sum() for t in range(1, T + 1)])
    closed = torch.tensor(
        [delta**2 * (T * (T + 1) * (2 * T + 1) - (t - 1) * t * (2 * t - 1)) / 6 for t in range(1, T + 1)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(theory, closed)  # Eq. (19)-(20)
    # The MSE estimate of a chi-square-like variable has relative std sqrt(2/n) ~ 0.32% at n = 2e5;
    # 2% relative is > 6 standard errors, so this fails only if the formula is wrong.
    torch.testing.assert_close(mse, theory, rtol=0.02, atol=0.0)
    # and the first token carries the most noise, O(T^3)
    assert mse[0] == mse.max()
    # token-level OPD (gamma = 0) only sees its own noise: MSE_t = delta^2 t^2
    err0 = discounted_returns(r, mask, 0.0).double() - discounted_returns(r_star, mask, 0.0).double()
    torch.testing.assert_close((err0**2).mean(0), delta**2 * ks**2, rtol=0.02, atol=0.0)
