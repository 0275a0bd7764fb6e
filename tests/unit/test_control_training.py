"""Control training: REINFORCE learns, OPD distils through the project's horizon windows and advantages."""

import pytest
import torch

from megatron_opd.config.tree import HorizonConfig
from megatron_opd.control.envs import SimpleNavigation, target_at
from megatron_opd.control.policies import AnalyticTeacher, MLPPolicy
from megatron_opd.control.rollout import success_rate
from megatron_opd.control.training import distill, reinforce_pretrain


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the CI machine has 2 shared cores and these ops are too small to split."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env():
    return SimpleNavigation(target_at(0.0, 8.0), horizon=50, distance=8.0, noise=0.1, goal_radius=1.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_reinforce_learns_the_simple_task():
    torch.manual_seed(0)
    env, policy = _env(), MLPPolicy(3, 1)
    before = success_rate(policy, env, 128, _gen(1))
    hist = reinforce_pretrain(policy, env, steps=30, batch=32, lr=3e-3, gamma=1.0, generator=_gen(2))
    after = success_rate(policy, env, 128, _gen(3))
    assert before < 0.2 and after > 0.8, (before, after, hist[-5:])


def _distill(horizon, steps, gamma=0.0):
    torch.manual_seed(0)
    env = _env()
    teacher = AnalyticTeacher(env.target, 8.0, action_scale=0.8, std=0.4)
    student = MLPPolicy(3, 0)
    hist = distill(
        student,
        teacher,
        env,
        horizon=horizon,
        gamma=gamma,
        steps=steps,
        batch=32,
        lr=3e-3,
        eval_every=max(1, steps // 2),
        eval_episodes=128,
        generator=_gen(4),
        eval_generator=_gen(5),
    )
    return hist


def test_token_level_opd_distils_the_analytic_teacher():
    hist = _distill(HorizonConfig(schedule="full"), steps=40)
    assert hist.success[0] < 0.2 and hist.success[-1] > 0.8, hist.success
    assert hist.mean_log_ratio[-1] > hist.mean_log_ratio[1]  # the student moved toward the teacher


def test_truncated_and_progressive_windows_bound_the_rollout():
    """TOPD rho=0.1 generates 5 of 50 steps; POPD (H0=1, dH=1, dk=2) generates 1, 1, 2, 2, ... steps."""
    topd = _distill(HorizonConfig(schedule="truncated", rho=0.1), steps=4)
    assert topd.horizon_end == [5, 5, 5] and topd.env_steps[-1] == 4 * 5 * 32
    popd = _distill(HorizonConfig(schedule="progressive", h0=1, delta_h=1, delta_k=2), steps=6)
    assert popd.horizon_end == [1, 2, 4] and popd.env_steps[-1] == (1 + 1 + 2 + 2 + 3 + 3) * 32
