"""Control policies: the Gaussian log-density, the incremental == parallel invariant, causality, bounds."""

import math

import pytest
import torch

from megatron_opd.control.envs import target_at
from megatron_opd.control.gaussian import GaussianHead, gaussian_logprob
from megatron_opd.control.policies import AnalyticTeacher, MLPPolicy, TransformerPolicy


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the CI machine has 2 shared cores and these ops are too small to split."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# fp32 throughout; incremental (KV-cache) and parallel attention sum in different orders, so they agree to
# float32 rounding of d = 64 dot products, far inside 1e-5.
ATOL = 1e-5


def test_gaussian_logprob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    a, m, s = (torch.randn(3, 5, 2, generator=g) for _ in range(3))
    want = torch.distributions.Normal(m, s.exp()).log_prob(a).sum(-1)
    torch.testing.assert_close(gaussian_logprob(a, m, s), want, atol=1e-6, rtol=1e-6)


def test_gaussian_head_respects_bounds():
    head = GaussianHead(4, 2, scale=0.8, min_std=0.5)
    h = 100 * torch.randn(1000, 4, generator=torch.Generator().manual_seed(1))
    mean, log_std = head(h)
    assert mean.abs().max() <= 0.8 + 1e-6
    assert log_std.min() >= math.log(0.4) - 1e-5 and log_std.max() <= math.log(0.8) + 1e-5


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_incremental_equals_parallel(kind):
    """Rollout-time log-probs (one step at a time, KV cache) == trainer log-probs (one parallel forward)."""
    torch.manual_seed(0)
    B, S = 3, 7
    policy = MLPPolicy(3, 1) if kind == "mlp" else TransformerPolicy(3, 1, max_len=S)
    obs = torch.randn(B, S, 3)
    with torch.no_grad():
        mean_p, log_std_p = policy(obs)
        cache = policy.init_cache(B)
        for t in range(S):
            mean_t, log_std_t, cache = policy.step(obs[:, t], cache)
            torch.testing.assert_close(mean_t, mean_p[:, t], atol=ATOL, rtol=0)
            torch.testing.assert_close(log_std_t, log_std_p[:, t], atol=ATOL, rtol=0)


def test_transformer_is_causal_and_reads_history():
    torch.manual_seed(0)
    policy = TransformerPolicy(3, 1, max_len=6)
    obs = torch.randn(2, 6, 3)
    changed = obs.clone()
    changed[:, 3] += 1.0
    with torch.no_grad():
        a, _ = policy(obs)
        b, _ = policy(changed)
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=ATOL, rtol=0)  # the future does not leak back
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-4  # later actions depend on the earlier history


def test_task_id_changes_the_policy():
    torch.manual_seed(0)
    student, teacher = MLPPolicy(3, 0), MLPPolicy(3, 1)
    teacher.load_state_dict(student.state_dict())
    obs = torch.randn(4, 3)
    assert (student(obs)[0] - teacher(obs)[0]).abs().max() > 1e-4


def test_analytic_teacher_steps_toward_target_capped():
    target = target_at(0.0, 8.0)
    teacher = AnalyticTeacher(target, 8.0, action_scale=0.8, std=0.4)
    obs = torch.tensor([[0.0, 0.0, 0.0], [7.9 / 8.0, 0.0, 0.5]])
    mean, log_std = teacher(obs)
    torch.testing.assert_close(mean, torch.tensor([[0.8, 0.0], [0.1, 0.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(log_std.exp(), torch.full((2, 2), 0.4), atol=1e-6, rtol=0)
