"""The ``train``, ``eval``, ``logging`` and ``checkpoint`` sections, and ``OPDConfig`` that gathers every section.

Why it exists: the run's bookkeeping (batches, data, evaluation, logs, checkpoints) and the whole tree with
its checks that need two sections at once (``config/tree.py`` re-exports all of it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_opd.config.base import ConfigError, check_range, fail
from megatron_opd.config.model import ModelConfig
from megatron_opd.config.objective import HorizonConfig, LossConfig, OptimizerConfig
from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.config.serving import RolloutConfig, TeacherConfig


@dataclass(kw_only=True)
class TrainConfig:
    """Batching, length of the run, data and seeds."""

    data_path: str | None = None
    """Prompt dataset (jsonl or parquet) with a prompt and a ground-truth answer per row."""
    prompt_key: str = "prompt"
    """Row field holding the prompt (a string or a chat message list, as in DAPO-Math-17K)."""
    answer_key: str = "answer"
    """Row field holding the ground-truth answer (dotted paths such as 'reward_model.ground_truth' work)."""
    apply_chat_template: bool = True
    """Format prompts with the tokenizer's chat template when it has one."""
    global_batch_size: int = 64
    """Prompts per optimizer step, summed over data-parallel ranks (paper: 64)."""
    n_samples_per_prompt: int = 4
    """Rollouts per prompt (paper: 4)."""
    micro_batch_size: int = 4
    """Rollouts per forward/backward micro-batch on each data-parallel rank."""
    epochs: int = 2
    """Passes over the prompt dataset (paper: 2)."""
    train_steps: int | None = None
    """Stop after this many optimizer steps; None runs all epochs."""
    seed: int = 1234
    """Seed of data order, sampling and initialisation."""
    max_consecutive_nonfinite_steps: int = 3
    """Skip a step whose loss or gradients are NaN/inf; stop the run after this many in a row."""
    steps_per_rollout: int = 1
    """Optimizer steps per rollout phase (k): one rollout phase samples the prompts of k consecutive steps at once
    (k x global_batch_size prompts, one larger generation batch, the horizon of its first step), and the k steps
    train on their own prompts' rollouts in order; the engine's weights are synced once per phase (and before an
    evaluation). Step s + j then trains on samples of the student of step s, j updates old (at most k - 1): a
    cheaper rollout per step for slightly off-policy samples. 1: every step samples from its own student (the
    paper's on-policy OPD). Phases start at multiples of k."""

    share_prompts: bool = False
    """Pack the rollouts of one prompt in one row of a micro-batch, the prompt computed once in the student's
    forward and backward and the in-step teacher's forward (``model/shared_prompts.py``): the same loss to fp32
    rounding for (n - 1) / n less work on prompt tokens, n = the prompt's rollouts in the micro-batch. Needs the
    SDPA core attention (the CPU/local layer spec), not Transformer-Engine's."""

    def __post_init__(self) -> None:
        check_range("train.global_batch_size", self.global_batch_size, 1)
        check_range("train.n_samples_per_prompt", self.n_samples_per_prompt, 1)
        check_range("train.micro_batch_size", self.micro_batch_size, 1)
        check_range("train.epochs", self.epochs, 1)
        check_range("train.train_steps", self.train_steps, 1)
        check_range("train.max_consecutive_nonfinite_steps", self.max_consecutive_nonfinite_steps, 1)
        check_range("train.steps_per_rollout", self.steps_per_rollout, 1)


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic evaluation: full rollouts, answers checked with math-verify."""

    eval_interval: int = 0
    """Evaluate every N optimizer steps; 0 disables periodic evaluation."""
    datasets: list[str] = field(default_factory=lambda: ["aime24", "aime25", "amc23"])
    """Benchmarks by name (shipped: aime24, aime25, amc23, math500) or paths to jsonl files."""
    n_samples: int = 16
    """k of avg@k and pass@k (paper: avg@16)."""
    temperature: float = 1.0
    """Sampling temperature at evaluation (the paper samples at 1.0)."""
    top_p: float = 1.0
    """Nucleus mass at evaluation."""
    max_new_tokens: int | None = None
    """Response budget at evaluation; None means rollout.max_response_length (full rollouts, as the paper)."""
    max_problems: int | None = None
    """Evaluate on the first N problems of each set only (for quick checks)."""
    at_start: bool = False
    """Evaluate the student once before the first step (the 'before' number)."""
    at_end: bool = True
    """Evaluate the student after the last step (when any evaluation is configured)."""
    eval_teacher: bool = False
    """Also evaluate the teacher once at start, to print it next to the student."""

    def __post_init__(self) -> None:
        check_range("eval.eval_interval", self.eval_interval, 0)
        check_range("eval.n_samples", self.n_samples, 1)
        check_range("eval.temperature", self.temperature, 0.0)
        check_range("eval.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("eval.max_new_tokens", self.max_new_tokens, 1)
        check_range("eval.max_problems", self.max_problems, 1)


@dataclass(kw_only=True)
class LoggingConfig:
    """What the user sees: console, progress bars and TensorBoard."""

    log_interval: int = 1
    """Print a metrics line every N steps."""
    log_dir: str | None = None
    """Where metrics.jsonl and the resolved config are written; None uses checkpoint.save (or writes none)."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory; None puts it under checkpoint.save/tensorboard, or disables it."""
    progress_bar: bool = True
    """Show a progress bar per step phase (rollout, teacher, train, sync)."""
    kl_position_buckets: int = 10
    """Number of equal-width buckets of response positions [0, rollout.max_response_length) for the logged KL and
    log-ratio by position (``opd_by_position/{kl,topk_kl,log_ratio,tokens}_bNN``); the same positions at every
    step whatever the horizon, so buckets past the window are left out (see loss/metrics.py)."""

    def __post_init__(self) -> None:
        check_range("logging.log_interval", self.log_interval, 1)
        check_range("logging.kl_position_buckets", self.kl_position_buckets, 1)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Saving and resuming (Megatron's --save/--load)."""

    save: str | None = None
    """Directory for checkpoints (iter_XXXXXXX folders and a 'latest' marker)."""
    load: str | None = None
    """Directory to resume from (its newest intact checkpoint). It must exist: a path that does not is an error
    (a typo must not start a run from scratch)."""
    allow_empty_load: bool = False
    """Start from the initial weights when ``load`` exists but holds no complete checkpoint (a job that resumes
    itself with load = save, killed before its first save). False: such a folder is an error."""
    save_interval: int = 0
    """Save every N steps; 0 saves only at the end of the run."""
    keep_last: int = 2
    """How many checkpoints to keep; older ones are deleted after a newer one is complete."""
    load_optimizer: bool = True
    """Restore optimizer state when loading (false: weights only, a warning is logged)."""

    def __post_init__(self) -> None:
        check_range("checkpoint.save_interval", self.save_interval, 0)
        check_range("checkpoint.keep_last", self.keep_last, 1)


@dataclass(kw_only=True)
class OPDConfig:
    """A whole run. Sections are addressed as ``section.field`` in YAML and on the command line."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The student."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process-group layout."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Student generation."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Teacher scoring."""
    horizon: HorizonConfig = field(default_factory=HorizonConfig)
    """Horizon schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches, data, seeds."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    def __post_init__(self) -> None:
        if self.horizon.schedule == "segment" and self.horizon.segment_unit == "tokens":
            if self.horizon.segment_end > self.rollout.max_response_length:
                fail(
                    "horizon.segment_end",
                    self.horizon.segment_end,
                    f"at most rollout.max_response_length ({self.rollout.max_response_length})",
                )
        if self.horizon.schedule == "progressive" and self.horizon.h0 > self.rollout.max_response_length:
            fail(
                "horizon.h0",
                self.horizon.h0,
                f"at most rollout.max_response_length ({self.rollout.max_response_length})",
            )
        k = self.train.steps_per_rollout
        if k > 1 and self.checkpoint.save_interval % k:
            fail(
                "checkpoint.save_interval",
                self.checkpoint.save_interval,
                f"a multiple of train.steps_per_rollout ({k}), so that every checkpoint falls between two rollout "
                "phases and a resumed run samples what an uninterrupted one would",
            )
        if self.loss.topk_kl_coef > 0 and self.teacher.topk == 0:
            fail("teacher.topk", 0, "a positive K when loss.topk_kl_coef > 0")
        if self.loss.full_kl_coef > 0 and self.teacher.backend != "megatron":
            fail(
                "loss.full_kl_coef",
                self.loss.full_kl_coef,
                "0 unless teacher.backend is 'megatron' (the other teachers return K logprobs per token, not the "
                "whole distribution)",
            )

    def check_world_size(self, world_size: int) -> int:
        """Validate the layout and batch sizes for ``world_size`` ranks; return the data-parallel size."""
        dp = self.parallel.resolve_data_parallel_size(world_size)
        rollouts = self.train.global_batch_size * self.train.n_samples_per_prompt
        per_rank = self.train.micro_batch_size * dp
        if rollouts % per_rank:
            raise ConfigError(
                f"global_batch_size ({self.train.global_batch_size}) x n_samples_per_prompt "
                f"({self.train.n_samples_per_prompt}) = {rollouts} rollouts is not divisible by micro_batch_size "
                f"({self.train.micro_batch_size}) x data-parallel size ({dp}) = {per_rank}; "
                "change one of them so each rank gets whole micro-batches"
            )
        if self.rollout.engine_ranks == "data_parallel" and self.train.global_batch_size % dp:
            raise ConfigError(
                f"rollout.engine_ranks 'data_parallel' splits the step's {self.train.global_batch_size} prompts "
                f"over {dp} data-parallel ranks: make train.global_batch_size a multiple of {dp}"
            )
        return dp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
