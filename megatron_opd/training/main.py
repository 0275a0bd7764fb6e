"""The OPD training loop: ``torchrun -m megatron_opd.training.main --config run.yaml [--section.field value]``.

Why it exists: this file is the method, readable top to bottom. At step k the horizon schedule gives the
window H_k; the student samples rollouts cut there; the teacher scores them; Megatron takes one optimizer step
on the token-level OPD loss inside the window; the new weights go to the rollout engine; then logging,
evaluation and checkpoints. With ``train.steps_per_rollout`` k > 1, one rollout phase samples the prompts of k
steps at once (the window of its first step) and the weights go to the engine once per phase (and before an
evaluation). Everything else lives in ``training/run.py``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from megatron_opd.config import parse_config
from megatron_opd.utils.errors import expected_errors_exit
from megatron_opd.utils.lifeline import bind_child_processes

if TYPE_CHECKING:
    from megatron_opd.data.sampler import PromptBatch
    from megatron_opd.rollout.types import RolloutResult
    from megatron_opd.training import run as R

# The processes the trainer forks (Megatron's file writers) or spawns (their queue's Manager, which imports this
# module as __mp_main__) die with it: a SIGKILLed trainer leaves none behind (utils/lifeline.py).
bind_child_processes(__name__)


def train(argv: list[str] | None = None) -> dict[str, Any]:
    """Run OPD as configured by ``argv``; returns {'initial_eval': scalars, 'steps': one scalars dict per step}."""
    cfg = parse_config(argv, prog="megatron_opd.training.main")
    # Imported after parsing so that --help and config errors answer at once, without loading Megatron and torch.
    from megatron_opd.training import run as R

    run = R.setup_run(cfg)
    log, evals = run.logger, {}
    log.text(f"writing: {log.outputs(cfg.checkpoint.save)}")
    if cfg.eval.eval_teacher and run.start_step == 0:
        evals.update(R.evaluate(run, 0, teacher=True))
    if cfg.eval.at_start and run.start_step == 0:
        evals.update(R.evaluate(run, 0))
        log.log(0, evals)

    # One rollout phase samples for train.steps_per_rollout steps (1: every step); its steps then pop their own.
    pending: list[tuple[PromptBatch, RolloutResult | None]] = []
    stale = False  # the engine's weights are behind the trainer's
    for step in range(run.start_step, run.total_steps):
        if not pending:
            window = run.schedule.window(step)  # H_k: TOPD, POPD (Eq. 11), segment or adaptive
            batches = [run.sampler.next_batch() for _ in range(R.rollout_phase_steps(run, step))]
            with log.phase("rollout", step):
                pending = list(zip(batches, R.generate_rollouts(run, batches, window, step), strict=True))
        prompts, rollouts = pending.pop(0)

        with log.phase("teacher", step):
            scores = R.score_rollouts(run, rollouts)
        with log.phase("train", step):
            micro_batches, stats = R.make_micro_batches(run, rollouts, scores, window)
            result = run.train_step(micro_batches)
        R.observe_horizon(run, step, result)
        R.check_finite(run, step, result)
        stale = stale or not result.skipped
        done = step + 1
        evaluating = bool(
            (cfg.eval.eval_interval and done % cfg.eval.eval_interval == 0)
            or (done == run.total_steps and cfg.eval.at_end and (cfg.eval.eval_interval or cfg.eval.at_start))
        )
        # The next rollout phase, or the evaluation, samples from the engine: bring it the step's weights.
        if stale and (not pending or evaluating):
            with log.phase("sync", step):
                stats.update(R.sync_weights(run))  # sync/seconds, sync/gb_per_s
            stale = False

        scalars = R.step_scalars(run, step, result, stats, window)
        if evaluating:
            scalars.update(R.evaluate(run, done))
        if (
            step % cfg.logging.log_interval == 0
            or done == run.total_steps
            or any(k.startswith("eval") for k in scalars)
        ):
            log.log(done, scalars, console_keys=_CONSOLE)
        run.history.append({"step": done, **scalars})
        log.log_prompts(done, prompts.epoch, prompts.indices)
        if cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0:
            R.save(run, done)

    if cfg.checkpoint.save and (
        not cfg.checkpoint.save_interval or run.total_steps % cfg.checkpoint.save_interval
    ):
        R.save(run, run.total_steps)
    R.close(run)  # leave the weight-sync group, stop servers the run launched
    _print_summary(run, evals, run.history[-1] if run.history else {})
    log.text(f"wrote: {log.outputs(cfg.checkpoint.save)}")
    log.close()
    return {"initial_eval": evals, "steps": run.history}


_CONSOLE = (
    "train/loss",
    "train/log_ratio_mean",
    "train/topk_kl_mean",
    "horizon/end",
    "rollout/response_length_mean",
    "rollout/truncation_rate",
    "time/step_s",
)


def _print_summary(run: R.Run, before: dict[str, float], after: dict[str, float]) -> None:
    """The before/after accuracy next to the teacher's, the headline of a run."""
    if not run.is_controller:
        return
    for key in sorted(k for k in after if k.startswith("eval/") and "/avg@" in k):
        teacher = before.get(key.replace("eval/", "eval_teacher/", 1))
        start = f"{before[key]:.3f} -> " if key in before else ""
        line = f"{key.removeprefix('eval/')}: student {start}{after[key]:.3f}"
        if teacher is not None:
            line += f" (teacher {teacher:.3f})"
        run.logger.text(line)


def main() -> None:
    # Expected failures (config, data, servers, checkpoints, vocabulary, conversion): one line on rank 0, exit 2.
    with expected_errors_exit():
        train(sys.argv[1:])


if __name__ == "__main__":
    main()
