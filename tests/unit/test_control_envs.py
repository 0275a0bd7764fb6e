"""Control environments: dynamics, goal and obstacle termination, masking of finished episodes."""

import pytest
import torch

from megatron_opd.control.envs import AutoregressiveNavigation, SimpleNavigation, target_at
from megatron_opd.control.policies import AnalyticTeacher
from megatron_opd.control.rollout import rollout


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the CI machine has 2 shared cores and these ops are too small to split."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _simple(noise=0.0):
    return SimpleNavigation(target_at(0.0, 8.0), horizon=50, distance=8.0, noise=noise, goal_radius=1.0)


def test_target_at_angle():
    torch.testing.assert_close(target_at(90.0, 2.0), torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)


def test_simple_dynamics_and_goal_termination():
    env, g = _simple(), torch.Generator().manual_seed(0)
    s = env.reset(2)
    s, r = env.step(s, torch.tensor([[0.5, 0.0], [0.0, 0.5]]), g)
    torch.testing.assert_close(s.pos, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(r, -(s.pos - env.target).norm(dim=-1) / 8.0)
    s.pos = torch.tensor([[6.8, 0.0], [0.0, 0.5]])
    s, _ = env.step(s, torch.tensor([[0.5, 0.0], [0.0, 0.5]]), g)
    assert s.done.tolist() == [True, False] and s.success.tolist() == [True, False]
    frozen = s.pos[0].clone()
    s, r = env.step(s, torch.tensor([[0.5, 0.5], [0.0, 0.5]]), g)
    torch.testing.assert_close(s.pos[0], frozen)  # a finished episode no longer moves
    assert r[0] == 0.0


def test_autoregressive_velocity_integration_clip_and_obstacle():
    env = AutoregressiveNavigation(
        target_at(0.0, 10.0),
        horizon=50,
        distance=10.0,
        noise=0.0,
        goal_radius=1.0,
        obstacle=(5.0, 0.0, 1.5),
        collision_penalty=10.0,
        max_speed=0.5,
    )
    g = torch.Generator().manual_seed(0)
    s = env.reset(1)
    for _ in range(3):
        s, _ = env.step(s, torch.tensor([[0.1, 0.0]]), g)
    torch.testing.assert_close(s.vel, torch.tensor([[0.3, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.pos, torch.tensor([[0.6, 0.0]]), atol=1e-6, rtol=0)  # 0.1 + 0.2 + 0.3
    for _ in range(5):
        s, _ = env.step(s, torch.tensor([[0.1, 0.0]]), g)
    assert abs(s.vel.norm().item() - 0.5) < 1e-5  # the speed is capped
    hit = False
    for _ in range(20):
        s, r = env.step(s, torch.zeros(1, 2), g)
        hit = hit or bool(r.item() < -5)
    assert hit and s.done.item() and not s.success.item()  # flew straight into the obstacle


def test_rollout_mask_stops_after_success():
    env = _simple(noise=0.0)
    teacher = AnalyticTeacher(env.target, 8.0, action_scale=0.8, std=1e-4)
    traj = rollout(teacher, env, 4, 50, torch.Generator().manual_seed(0))
    # 0.8 per step toward a target 8 away with a goal disc of radius 1: inside after 9 steps
    assert traj.success.all()
    assert traj.mask.sum(1).tolist() == [9, 9, 9, 9]
    assert (traj.rewards[:, 9:] == 0).all()
    assert traj.positions.shape == (4, 51, 2) and traj.obs.shape == (4, 50, 3)


def test_final_rule_runs_through_the_disc_and_counts_the_position_at_t_equals_T():
    env = SimpleNavigation(
        target_at(0.0, 8.0), horizon=50, distance=8.0, noise=0.0, goal_radius=1.0, success_rule="final"
    )
    g = torch.Generator().manual_seed(0)
    s = env.reset(2)
    for t in range(12):  # row 0 flies on at 0.8 per step, row 1 stops at x = 8 (inside the disc)
        a = torch.tensor([[0.8, 0.0], [0.8 if t < 10 else 0.0, 0.0]])
        s, _ = env.step(s, a, g)
        if t == 9:  # both at x = 8.0: inside the disc, and the episodes go on
            assert s.success.tolist() == [True, True] and not s.done.any()
    torch.testing.assert_close(s.pos[:, 0], torch.tensor([9.6, 8.0]))
    assert s.reached.tolist() == [True, True]  # the reach rule counts both
    assert s.success.tolist() == [False, True]  # the final position counts only the one that stayed
    assert env.with_success_rule("reach").success_rule == "reach" and env.success_rule == "final"
    with pytest.raises(ValueError, match="success_rule"):
        SimpleNavigation(
            target_at(0.0, 8.0), horizon=50, distance=8.0, noise=0.0, goal_radius=1.0, success_rule="x"
        )
