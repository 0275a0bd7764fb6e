"""Sampling trajectories from a control policy: the control-task analogue of generation.

Why it exists: OPD, POPD and TOPD differ only in how many steps are generated (``HorizonWindow.generate``)
and which are distilled; REINFORCE pre-training and evaluation sample the same way. One function, batched
over environments, records what every consumer needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd.control.envs import NavState, _Navigation
from megatron_opd.control.gaussian import gaussian_logprob
from megatron_opd.control.policies import ControlPolicy


@dataclass
class Trajectories:
    """A batch of B episodes of S steps."""

    obs: torch.Tensor
    """[B, S, O] observations the policy acted on."""
    actions: torch.Tensor
    """[B, S, 2] sampled actions."""
    logprobs: torch.Tensor
    """[B, S] log-density of each action under the sampling policy (at rollout time)."""
    mask: torch.Tensor
    """[B, S] bool, the episode was still running when the action was taken (the "response mask")."""
    rewards: torch.Tensor
    """[B, S] task reward of each step (0 once finished)."""
    positions: torch.Tensor
    """[B, S + 1, 2] positions, starting at the origin."""
    final: NavState
    """State after the last step."""

    @property
    def success(self) -> torch.Tensor:
        """[B] bool, the goal was reached within the S steps."""
        return self.final.success


@torch.no_grad()
def rollout(
    policy: ControlPolicy, env: _Navigation, batch: int, steps: int, generator: torch.Generator
) -> Trajectories:
    """Sample ``batch`` episodes of ``steps`` steps (all environments stepped together, no gradient)."""
    state = env.reset(batch)
    cache = policy.init_cache(batch)
    obs, actions, logps, masks, rewards, positions = [], [], [], [], [], [state.pos]
    for t in range(steps):
        o = env.observe(state, t)
        mean, log_std, cache = policy.step(o, cache)
        a = mean + torch.exp(log_std) * torch.randn(mean.shape, generator=generator)
        masks.append(~state.done)
        state, r = env.step(state, a, generator)
        obs.append(o)
        actions.append(a)
        logps.append(gaussian_logprob(a, mean, log_std))
        rewards.append(r)
        positions.append(state.pos)
    return Trajectories(
        obs=torch.stack(obs, 1),
        actions=torch.stack(actions, 1),
        logprobs=torch.stack(logps, 1),
        mask=torch.stack(masks, 1),
        rewards=torch.stack(rewards, 1),
        positions=torch.stack(positions, 1),
        final=state,
    )


@torch.no_grad()
def success_rate(policy: ControlPolicy, env: _Navigation, episodes: int, generator: torch.Generator) -> float:
    """Fraction of ``episodes`` sampled full-horizon episodes that succeed under ``env.success_rule`` (the
    paper's avg@N)."""
    return rollout(policy, env, episodes, env.horizon, generator).success.float().mean().item()


@torch.no_grad()
def success_rates(
    policy: ControlPolicy, env: _Navigation, episodes: int, generator: torch.Generator
) -> dict[str, float]:
    """Success of ``episodes`` full-horizon episodes under both rules, from one rollout: {'reach', 'final'}.

    The rollout runs on ``env`` under the ``final`` rule; its ``reached`` flags are what the ``reach`` rule would
    have counted on the same random draws (envs module docstring), so ``reach`` equals ``success_rate`` on the
    ``reach`` task with the same generator state.
    """
    traj = rollout(policy, env.with_success_rule("final"), episodes, env.horizon, generator)
    return {
        "reach": traj.final.reached.float().mean().item(),
        "final": traj.final.success.float().mean().item(),
    }
