"""The paper's control experiments as functions: Fig. 3, Fig. 14 (simple task), Table 2 and Fig. 8 (autoregressive).

Why it exists: the reproduction script, the CI short mode and the docs all run the same experiments at
different sizes (``ControlScale``); the results are plain JSON-able dicts so ``report`` can redraw tables and
plots without rerunning anything.

Protocol (the paper leaves most of it open; these are our choices, documented in docs/control_reproduction.md):
the teacher (task id 1, target at angle 0) and each initial student (task id 0, target at the mismatch angle)
are pre-trained once with REINFORCE from seed 0; each distillation seed then varies only the sampling. OPD is
token-level unless named sequence-level; POPD uses H0 = 1, dH = 1, dk = 2 (Appendix B), TOPD H = ceil(rho*50).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from megatron_opd.config.tree import HorizonConfig
from megatron_opd.control.envs import AutoregressiveNavigation, SimpleNavigation, target_at
from megatron_opd.control.policies import AnalyticTeacher, ControlPolicy, MLPPolicy, TransformerPolicy
from megatron_opd.control.rollout import rollout, success_rate, success_rates
from megatron_opd.control.training import DistillHistory, distill, reinforce_pretrain

HORIZON = 50
"""Maximum rollout horizon of both tasks (Appendix B)."""
SIMPLE_DISTANCE = 8.0
"""Distance of every target from the start in the simple task."""
AR_DISTANCE = 10.0
"""Distance of the targets in the autoregressive task."""
AR_OBSTACLE = (5.0, 0.0, 1.5)
"""(x, y, radius) of the obstacle, half way along the straight line to the teacher's target."""


@dataclass(kw_only=True)
class ControlScale:
    """How large a reproduction run is (``SHORT`` for CI, ``FULL`` for the docs)."""

    simple_seeds: tuple[int, ...] = (0, 1)
    """Distillation seeds of the simple-task runs (pre-training always uses seed 0)."""
    angles: tuple[float, ...] = (30.0, 45.0, 60.0, 75.0, 90.0)
    """Fig. 3 mismatch angles in degrees between teacher and initial-student targets."""
    simple_pretrain_steps: int = 100
    """REINFORCE steps for each simple-task policy."""
    simple_distill_steps: int = 400
    """OPD steps per simple-task run."""
    simple_lr: float = 1e-3
    """Adam learning rate of simple-task distillation."""
    simple_eval_every: int = 20
    """Evaluate simple-task students every this many steps."""
    ar_seeds: tuple[int, ...] = (0, 1, 2)
    """Distillation seeds of the autoregressive-task runs."""
    ar_angle: float = 60.0
    """Mismatch angle of the autoregressive task (Table 2)."""
    ar_pretrain_steps: int = 150
    """REINFORCE steps for each autoregressive-task policy."""
    ar_distill_steps: int = 150
    """OPD/POPD/TOPD steps per autoregressive run."""
    ar_lr: float = 1e-3
    """Adam learning rate of autoregressive-task distillation."""
    ar_eval_every: int = 10
    """Evaluate autoregressive-task students every this many steps."""
    topd_rhos: tuple[float, ...] = (0.25, 0.2, 0.1)
    """TOPD truncation ratios of Table 2."""
    batch: int = 64
    """Episodes per training step."""
    eval_episodes: int = 256
    """Episodes per evaluation (the paper's avg@256)."""
    plot_episodes: int = 16
    """Trajectories kept per final student for the plots."""


FULL = ControlScale()
SHORT = ControlScale(
    simple_seeds=(0,),
    angles=(90.0,),
    simple_pretrain_steps=50,
    simple_distill_steps=40,
    simple_eval_every=10,
    ar_seeds=(0,),
    ar_pretrain_steps=60,
    ar_distill_steps=50,
    topd_rhos=(0.25, 0.1),
    eval_episodes=128,
    plot_episodes=8,
)


def simple_task(angle_deg: float) -> SimpleNavigation:
    """Section 3.1 task with its target at ``angle_deg``."""
    return SimpleNavigation(
        target_at(angle_deg, SIMPLE_DISTANCE),
        horizon=HORIZON,
        distance=SIMPLE_DISTANCE,
        noise=0.1,
        goal_radius=1.0,
    )


def ar_task(angle_deg: float) -> AutoregressiveNavigation:
    """Appendix D task with its target at ``angle_deg`` and the obstacle on the way to angle 0."""
    return AutoregressiveNavigation(
        target_at(angle_deg, AR_DISTANCE),
        horizon=HORIZON,
        distance=AR_DISTANCE,
        noise=0.01,
        goal_radius=1.0,
        obstacle=AR_OBSTACLE,
        collision_penalty=10.0,
        max_speed=0.5,
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pretrain(
    kind: str, task_id: int, angle_deg: float, steps: int, seed: int = 0
) -> tuple[ControlPolicy, float]:
    """REINFORCE a fresh ``kind`` ('simple' | 'ar') policy toward ``angle_deg``; returns it and its success."""
    torch.manual_seed(seed)
    if kind == "simple":
        env, policy, lr = simple_task(angle_deg), MLPPolicy(3, task_id), 3e-3
    else:
        env, policy, lr = ar_task(angle_deg), TransformerPolicy(3, task_id, max_len=HORIZON), 1e-3
    reinforce_pretrain(
        policy, env, steps=steps, batch=64, lr=lr, gamma=1.0, generator=_gen(seed + 1000 * task_id)
    )
    return policy, success_rate(policy, env, 256, _gen(seed + 7))


def _paths(policy: ControlPolicy, env, n: int, seed: int) -> list:
    traj = rollout(policy, env, n, HORIZON, _gen(seed))
    return traj.positions.tolist()


def _run(
    student0,
    teacher,
    env,
    horizon: HorizonConfig,
    gamma: float,
    steps: int,
    lr: float,
    every: int,
    seed: int,
    s: ControlScale,
) -> dict[str, Any]:
    student = copy.deepcopy(student0)
    torch.manual_seed(seed)
    hist = distill(
        student,
        teacher,
        env,
        horizon=horizon,
        gamma=gamma,
        steps=steps,
        batch=s.batch,
        lr=lr,
        eval_every=every,
        eval_episodes=s.eval_episodes,
        generator=_gen(10_000 + seed),
        eval_generator=_gen(20_000 + seed),
    )
    return {**asdict(hist), "paths": _paths(student, env, s.plot_episodes, 30_000 + seed)}


def run_fig3(s: ControlScale, *, log=print) -> dict[str, Any]:
    """Token- vs sequence-level OPD at each mismatch angle (Fig. 3); also Fig. 14's learned-teacher baseline."""
    teacher, teacher_success = pretrain("simple", 1, 0.0, s.simple_pretrain_steps)
    env = simple_task(0.0)
    out: dict[str, Any] = {
        "teacher_success": teacher_success,
        "teacher_paths": _paths(teacher, env, s.plot_episodes, 1),
    }
    out["angles"] = {}
    for angle in s.angles:
        t0 = time.time()
        student0, student_success = pretrain("simple", 0, angle, s.simple_pretrain_steps)
        rec: dict[str, Any] = {
            "student_init_success_own_target": student_success,
            "student_init_paths": _paths(student0, env, s.plot_episodes, 2),
        }
        for name, gamma in (("token", 0.0), ("sequence", 1.0)):
            rec[name] = [
                _run(
                    student0,
                    teacher,
                    env,
                    HorizonConfig(schedule="full"),
                    gamma,
                    s.simple_distill_steps,
                    s.simple_lr,
                    s.simple_eval_every,
                    seed,
                    s,
                )
                for seed in s.simple_seeds
            ]
        out["angles"][str(int(angle))] = rec
        log(f"fig3 angle {angle:.0f}: {_summary(rec, ('token', 'sequence'))} ({time.time() - t0:.0f}s)")
    return out


def run_fig14(s: ControlScale, angle_deg: float = 90.0, *, log=print) -> dict[str, Any]:
    """Token- and sequence-level OPD under the analytic optimal teacher (Fig. 14), at ``angle_deg`` mismatch."""
    t0 = time.time()
    env = simple_task(0.0)
    teacher = AnalyticTeacher(env.target, SIMPLE_DISTANCE, action_scale=0.8, std=0.4)
    student0, _ = pretrain("simple", 0, angle_deg, s.simple_pretrain_steps)
    rec: dict[str, Any] = {"angle": angle_deg, "teacher_success": success_rate(teacher, env, 256, _gen(3))}
    for name, gamma in (("token", 0.0), ("sequence", 1.0)):
        rec[name] = [
            _run(
                student0,
                teacher,
                env,
                HorizonConfig(schedule="full"),
                gamma,
                s.simple_distill_steps,
                s.simple_lr,
                s.simple_eval_every,
                seed,
                s,
            )
            for seed in s.simple_seeds
        ]
    log(f"fig14 angle {angle_deg:.0f}: {_summary(rec, ('token', 'sequence'))} ({time.time() - t0:.0f}s)")
    return rec


def ar_methods(s: ControlScale) -> dict[str, HorizonConfig]:
    """Table 2's rows as horizon configs: OPD (full), POPD (H0=1, dH=1, dk=2), TOPD at each rho."""
    methods = {
        "OPD": HorizonConfig(schedule="full"),
        "POPD": HorizonConfig(schedule="progressive", h0=1, delta_h=1, delta_k=2),
    }
    for rho in s.topd_rhos:
        methods[f"TOPD rho={rho:g}"] = HorizonConfig(schedule="truncated", rho=rho)
    return methods


def run_table2(
    s: ControlScale, *, methods: dict[str, HorizonConfig] | None = None, log=print
) -> dict[str, Any]:
    """OPD, POPD and TOPD on the autoregressive task (Table 2; Fig. 8 reads the OPD and POPD curves)."""
    t0 = time.time()
    teacher, teacher_success = pretrain("ar", 1, 0.0, s.ar_pretrain_steps)
    student0, student_success = pretrain("ar", 0, s.ar_angle, s.ar_pretrain_steps)
    env = ar_task(0.0)
    out: dict[str, Any] = {
        "angle": s.ar_angle,
        "teacher_success": teacher_success,
        # both rules on fresh episodes (teacher_success is pre-training's own check, reach rule)
        "teacher_success_rules": success_rates(teacher, env, 256, _gen(5)),
        "student_init_success_rules": success_rates(student0, env, 256, _gen(6)),
        "student_init_success_own_target": student_success,
        "student_init_success_teacher_target": success_rate(student0, env, 256, _gen(4)),
        "teacher_paths": _paths(teacher, env, s.plot_episodes, 1),
        "student_init_paths": _paths(student0, env, s.plot_episodes, 2),
        "pretrain_seconds": time.time() - t0,
        "methods": {},
    }
    log(
        f"table2 pretraining: teacher {teacher_success:.2f}, student {student_success:.2f} ({time.time() - t0:.0f}s)"
    )
    for name, horizon in (methods or ar_methods(s)).items():
        t1 = time.time()
        out["methods"][name] = [
            _run(student0, teacher, env, horizon, 0.0, s.ar_distill_steps, s.ar_lr, s.ar_eval_every, seed, s)
            for seed in s.ar_seeds
        ]
        log(f"table2 {name}: {_summary(out['methods'], (name,))} ({time.time() - t1:.0f}s)")
    return out


def _summary(rec: dict[str, Any], names: tuple[str, ...]) -> str:
    parts = []
    for n in names:
        finals = [r["success"][-1] for r in rec[n]]
        parts.append(f"{n} final {sum(finals) / len(finals):.2f}")
    return ", ".join(parts)


def mean_curve(runs: list[dict[str, Any]], key: str = "success") -> list[float]:
    """Seed-mean of ``key`` at each evaluation (all runs share evaluation steps)."""
    return [sum(v) / len(v) for v in zip(*(r[key] for r in runs))]


def best_success(runs: list[dict[str, Any]], key: str = "success") -> float:
    """Table 2's statistic: the success rate at the best evaluation step of the seed-mean curve (``key``
    'success_final' for the strict rule)."""
    return max(mean_curve(runs, key))


def final_success(runs: list[dict[str, Any]], key: str = "success") -> float:
    """Seed-mean success at the last evaluation."""
    return mean_curve(runs, key)[-1]


def steps_to_reach(runs: list[dict[str, Any]], level: float) -> list[int | None]:
    """Per seed, the first evaluated step with success >= ``level`` (None if never)."""
    return [
        DistillHistory(eval_steps=r["eval_steps"], success=r["success"]).first_step_reaching(level)
        for r in runs
    ]
