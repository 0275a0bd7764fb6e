"""REINFORCE pre-training and OPD / POPD / TOPD distillation of the control policies.

Why it exists: this is the control-task training loop, written with the LLM path's own pieces so that a
result here says something about them: the horizon window of step k comes from
``algorithms.horizon.build_horizon_schedule`` (full = OPD, progressive = POPD, truncated = TOPD), the
advantages from ``algorithms.advantage`` (gamma = 0 token-level, gamma = 1 sequence-level) and the loss from
``loss.reference.opd_loss``. The per-step log-prob is a Gaussian log-density (``gaussian``) instead of a
token log-prob; the tensors are the same [B, T].

REINFORCE pre-training uses the same loss with A_t = return-to-go of the task reward minus a per-position
batch-mean baseline (``discounted_returns``), i.e. the policy gradient of Williams (1992).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from megatron_opd.algorithms.advantage import discounted_returns, opd_advantages
from megatron_opd.algorithms.horizon import build_horizon_schedule
from megatron_opd.config.tree import HorizonConfig
from megatron_opd.control.envs import _Navigation
from megatron_opd.control.gaussian import gaussian_logprob
from megatron_opd.control.policies import ControlPolicy
from megatron_opd.control.rollout import Trajectories, rollout, success_rates
from megatron_opd.loss.reference import opd_loss


def trajectory_logprobs(policy: ControlPolicy, traj: Trajectories) -> torch.Tensor:
    """log pi(a_t | history) of the recorded actions, all positions in one parallel forward; [B, S]."""
    mean, log_std = policy(traj.obs)
    return gaussian_logprob(traj.actions, mean, log_std)


def _optimizer_step(
    opt: torch.optim.Optimizer, policy: ControlPolicy, loss: torch.Tensor, clip: float
) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
    opt.step()
    return float(norm)


def reinforce_pretrain(
    policy: ControlPolicy,
    env: _Navigation,
    *,
    steps: int,
    batch: int,
    lr: float,
    gamma: float,
    generator: torch.Generator,
    clip: float = 1.0,
    smooth: int = 10,
) -> list[float]:
    """Train ``policy`` toward ``env``'s target with REINFORCE; returns the success rate of each batch.

    REINFORCE on these tasks can collapse after converging (a Transformer teacher went from 96% to 0% between
    two checks), so the weights with the best ``smooth``-batch mean success are restored at the end.
    """
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    history: list[float] = []
    best, best_state = -1.0, None
    for _ in range(steps):
        traj = rollout(policy, env, batch, env.horizon, generator)
        returns = discounted_returns(traj.rewards, traj.mask, gamma)
        m = traj.mask.float()
        baseline = (returns * m).sum(0) / m.sum(0).clamp(min=1.0)
        adv = (returns - baseline) * m
        loss = opd_loss(trajectory_logprobs(policy, traj), adv, traj.mask)
        _optimizer_step(opt, policy, loss, clip)
        history.append(traj.success.float().mean().item())
        recent = sum(history[-smooth:]) / len(history[-smooth:])
        if len(history) >= min(smooth, steps) and recent >= best:
            best, best_state = recent, copy.deepcopy(policy.state_dict())
    if best_state is not None:
        policy.load_state_dict(best_state)
    return history


@dataclass
class DistillHistory:
    """What a distillation run measured; lists are indexed by evaluation."""

    eval_steps: list[int] = field(default_factory=list)
    """Optimizer steps completed before each evaluation."""
    success: list[float] = field(default_factory=list)
    """Full-horizon success rate of the student (toward the teacher's target) at each evaluation, under the
    ``reach`` rule (the goal disc entered at any step; ``control.envs``)."""
    success_final: list[float] = field(default_factory=list)
    """The same evaluations under the strict ``final`` rule: the position at t = T inside the goal disc."""
    env_steps: list[int] = field(default_factory=list)
    """Environment steps generated for training so far (the rollout cost) at each evaluation."""
    seconds: list[float] = field(default_factory=list)
    """Wall-clock seconds of training so far at each evaluation (evaluation time excluded)."""
    horizon_end: list[int] = field(default_factory=list)
    """The horizon window's end at each evaluation."""
    mean_log_ratio: list[float] = field(default_factory=list)
    """Mean r_t over the distilled positions of the last training batch before each evaluation."""

    @property
    def best_success(self) -> float:
        """Success at the best evaluation step (how the paper's Table 2 reports)."""
        return max(self.success) if self.success else float("nan")

    def first_step_reaching(self, level: float) -> int | None:
        """First evaluated step with success >= ``level``, or None."""
        return next((s for s, v in zip(self.eval_steps, self.success) if v >= level), None)


def distill(
    student: ControlPolicy,
    teacher: ControlPolicy,
    env: _Navigation,
    *,
    horizon: HorizonConfig,
    gamma: float,
    steps: int,
    batch: int,
    lr: float,
    eval_every: int,
    eval_episodes: int,
    generator: torch.Generator,
    eval_generator: torch.Generator,
    clip: float = 1.0,
) -> DistillHistory:
    """On-policy distillation of ``teacher`` into ``student`` on ``env`` (the teacher's task).

    Step k: window = schedule.window(k); the student samples ``window.generate`` steps; the teacher scores the
    student's actions on the same histories; A_t = opd_advantages(log p_T, log p_S, window mask, gamma); one
    Adam step on opd_loss. Evaluation samples full-horizon (T) episodes regardless of the window and counts
    success under both rules (``success``, ``success_final``).
    """
    schedule = build_horizon_schedule(horizon, env.horizon)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    hist = DistillHistory()
    env_steps, seconds, last_r = 0, 0.0, float("nan")
    for k in range(steps + 1):
        if k % eval_every == 0 or k == steps:
            hist.eval_steps.append(k)
            rates = success_rates(student, env, eval_episodes, eval_generator)
            hist.success.append(rates["reach"])
            hist.success_final.append(rates["final"])
            hist.env_steps.append(env_steps)
            hist.seconds.append(seconds)
            hist.horizon_end.append(schedule.window(k).end)
            hist.mean_log_ratio.append(last_r)
        if k == steps:
            break
        t0 = time.perf_counter()
        window = schedule.window(k)
        traj = rollout(student, env, batch, window.generate, generator)
        mask = window.mask(traj.mask)
        student_lp = trajectory_logprobs(student, traj)
        with torch.no_grad():
            teacher_lp = trajectory_logprobs(teacher, traj)
        adv = opd_advantages(teacher_lp, student_lp, mask, gamma)
        loss = opd_loss(student_lp, adv, mask)
        _optimizer_step(opt, student, loss, clip)
        env_steps += int(traj.mask.sum())
        seconds += time.perf_counter() - t0
        last_r = ((teacher_lp - student_lp.detach()) * mask).sum().item() / max(1, int(mask.sum()))
    return hist
