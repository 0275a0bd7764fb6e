"""The two navigation tasks of the paper, vectorised over a batch of environments.

Why it exists: the control experiments need thousands of short episodes per minute on one CPU thread, so each
task is a handful of batched tensor operations per time step, with no Python loop over environments.

- ``SimpleNavigation`` (Section 3.1): position p in R^2, s_{t+1} = s_t + a_t + z, z ~ N(0, noise^2); the policy
  observes [p / distance, t / T] (the task id is the policy's own, see ``policies``).
- ``AutoregressiveNavigation`` (Appendix D): the action is an acceleration, v_{t+1} = clip(v_t + a_t + z),
  p_{t+1} = p_t + v_{t+1}; the policy observes only [v_t / max_speed, t / T], so it must integrate its velocity
  history to know where it is. A circular obstacle sits on the straight line to the teacher's target, so the
  teacher's behaviour is phase-dependent (head out, swerve, turn back in).

Episodes end when the position enters the goal disc (success) or the obstacle (failure); a finished
environment stays frozen and its later steps are masked out, like the padding after an EOS token. Targets lie
at ``distance`` from the origin at ``angle_deg`` (0 is the +x axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class NavState:
    """Batched environment state; every tensor has batch size B."""

    pos: torch.Tensor
    """[B, 2] positions."""
    vel: torch.Tensor
    """[B, 2] velocities (zero and unused in the simple task)."""
    done: torch.Tensor
    """[B] bool, episode over (goal reached or obstacle hit)."""
    success: torch.Tensor
    """[B] bool, goal reached."""


def target_at(angle_deg: float, distance: float) -> torch.Tensor:
    """The point at ``distance`` from the origin in direction ``angle_deg``; [2] float32."""
    a = math.radians(angle_deg)
    return torch.tensor([distance * math.cos(a), distance * math.sin(a)], dtype=torch.float32)


class _Navigation:
    """Shared goal/obstacle logic; subclasses define the dynamics and the observation."""

    obs_dim: int = 3

    def __init__(
        self,
        target: torch.Tensor,
        *,
        horizon: int,
        distance: float,
        noise: float,
        goal_radius: float,
        obstacle: tuple[float, float, float] | None = None,
        collision_penalty: float = 0.0,
    ) -> None:
        self.target = target.float()
        self.horizon, self.distance, self.noise, self.goal_radius = horizon, distance, noise, goal_radius
        self.obstacle = obstacle
        self.collision_penalty = collision_penalty

    def reset(self, batch: int) -> NavState:
        z = torch.zeros(batch, 2)
        f = torch.zeros(batch, dtype=torch.bool)
        return NavState(pos=z, vel=z.clone(), done=f, success=f.clone())

    def _move(
        self, state: NavState, action: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def observe(self, state: NavState, t: int) -> torch.Tensor:
        raise NotImplementedError

    def step(
        self, state: NavState, action: torch.Tensor, generator: torch.Generator
    ) -> tuple[NavState, torch.Tensor]:
        """Apply ``action`` [B, 2]; returns the new state and the reward [B] earned by this step.

        The reward (used only by REINFORCE pre-training) is -||p_{t+1} - target|| / distance while the episode
        runs, minus ``collision_penalty`` on the step that hits the obstacle; finished episodes earn 0.
        """
        alive = ~state.done
        noise = self.noise * torch.randn(action.shape, generator=generator)
        pos, vel = self._move(state, action.float(), noise)
        keep = alive.unsqueeze(-1)
        pos = torch.where(keep, pos, state.pos)
        vel = torch.where(keep, vel, state.vel)
        dist = (pos - self.target).norm(dim=-1)
        reached = alive & (dist < self.goal_radius)
        hit = torch.zeros_like(reached)
        if self.obstacle is not None:
            cx, cy, r = self.obstacle
            hit = alive & ~reached & ((pos - torch.tensor([cx, cy])).norm(dim=-1) < r)
        reward = torch.where(
            alive, -dist / self.distance - self.collision_penalty * hit.float(), torch.zeros_like(dist)
        )
        new = NavState(pos=pos, vel=vel, done=state.done | reached | hit, success=state.success | reached)
        return new, reward


class SimpleNavigation(_Navigation):
    """Section 3.1: the action is a displacement; observation [x / distance, y / distance, t / T]."""

    def _move(self, state, action, noise):
        return state.pos + action + noise, state.vel

    def observe(self, state: NavState, t: int) -> torch.Tensor:
        tt = torch.full((state.pos.shape[0], 1), t / self.horizon)
        return torch.cat([state.pos / self.distance, tt], dim=-1)


class AutoregressiveNavigation(_Navigation):
    """Appendix D: the action is an acceleration; observation [vx, vy] / max_speed and t / T."""

    def __init__(self, target: torch.Tensor, *, max_speed: float, **kwargs) -> None:
        super().__init__(target, **kwargs)
        self.max_speed = max_speed

    def _move(self, state, action, noise):
        vel = state.vel + action + noise
        speed = vel.norm(dim=-1, keepdim=True)
        vel = vel * torch.clamp(self.max_speed / speed.clamp(min=1e-8), max=1.0)
        return state.pos + vel, vel

    def observe(self, state: NavState, t: int) -> torch.Tensor:
        tt = torch.full((state.pos.shape[0], 1), t / self.horizon)
        return torch.cat([state.vel / self.max_speed, tt], dim=-1)
