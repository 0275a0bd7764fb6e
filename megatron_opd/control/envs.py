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

Two success rules (``success_rule``): ``reach`` (the default, used for training) counts an episode that enters
the goal disc at any step, and ends it there, so a policy that flies through the disc still succeeds; ``final``
lets episodes run on through the disc (only the obstacle ends them) and counts the position at t = T inside the
radius. Both see the same random draws, so a ``final`` episode is step for step the ``reach`` one until it
first enters the disc, and its ``reached`` flag is the ``reach`` rule's success: one ``final`` rollout gives both.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

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
    """[B] bool, a success so far under the environment's ``success_rule``."""
    reached: torch.Tensor
    """[B] bool, entered the goal disc at some step before any obstacle hit (the ``reach`` rule's success)."""


def target_at(angle_deg: float, distance: float) -> torch.Tensor:
    """The point at ``distance`` from the origin in direction ``angle_deg``; [2] float32."""
    a = math.radians(angle_deg)
    return torch.tensor([distance * math.cos(a), distance * math.sin(a)], dtype=torch.float32)


SUCCESS_RULES = ("reach", "final")
"""``reach``: the goal disc entered at any step (the episode ends there); ``final``: inside it at t = T."""


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
        success_rule: Literal["reach", "final"] = "reach",
    ) -> None:
        if success_rule not in SUCCESS_RULES:
            raise ValueError(f"success_rule must be one of {SUCCESS_RULES}, got {success_rule!r}")
        self.target = target.float()
        self.horizon, self.distance, self.noise, self.goal_radius = horizon, distance, noise, goal_radius
        self.obstacle = obstacle
        self.collision_penalty = collision_penalty
        self.success_rule = success_rule

    def with_success_rule(self, rule: Literal["reach", "final"]) -> _Navigation:
        """A copy of this task that counts success by ``rule`` (module docstring)."""
        if rule not in SUCCESS_RULES:
            raise ValueError(f"success rule must be one of {SUCCESS_RULES}, got {rule!r}")
        other = copy.copy(self)
        other.success_rule = rule
        return other

    def reset(self, batch: int) -> NavState:
        z = torch.zeros(batch, 2)
        f = torch.zeros(batch, dtype=torch.bool)
        return NavState(pos=z, vel=z.clone(), done=f, success=f.clone(), reached=f.clone())

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
        in_goal = dist < self.goal_radius
        reached = alive & in_goal
        hit = torch.zeros_like(reached)
        if self.obstacle is not None:
            cx, cy, r = self.obstacle
            hit = alive & ~reached & ((pos - torch.tensor([cx, cy])).norm(dim=-1) < r)
        reward = torch.where(
            alive, -dist / self.distance - self.collision_penalty * hit.float(), torch.zeros_like(dist)
        )
        ever = state.reached | reached
        if self.success_rule == "reach":
            done, success = state.done | reached | hit, ever
        else:  # only the obstacle ends an episode; success is being inside the disc now (at t = T: the rule)
            done = state.done | hit
            success = ~done & in_goal
        return NavState(pos=pos, vel=vel, done=done, success=success, reached=ever), reward


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
