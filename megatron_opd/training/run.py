"""The pieces of an OPD run that the loop in ``training/main.py`` strings together.

Why it exists: the entry point should read as the loop (rollout, teacher, step, sync, log, evaluate, save);
everything it needs is built and wired here once: the parallel layout, the Megatron student and its optimizer,
the rollout engine and the teacher, the data sampler, the horizon schedule, logging and checkpoints.

Placement. Rank 0 is the controller: it drives the rollout engine and the teacher (in-process, or clients of
SGLang servers), then hands the scored rollouts over as tensors (``training/handover.py``): each data-parallel
rank receives only its share, already cut into micro-batches for Megatron's schedule. With
``rollout.engine_ranks: data_parallel`` every data-parallel replica's leader has its own embedded engine and
generates its own share instead (``training/local_rollouts.py``). After each optimizer step
each pipeline stage's first rank sends its own layers, in their HF names (TP shards joined), to the rollout engine
(``training/weight_sync.py``), so the next rollouts are on-policy. Everything random is seeded from
(train.seed, step), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from megatron_opd.algorithms.horizon import (
    HorizonSchedule,
    HorizonWindow,
    build_horizon_schedule,
    schedule_summary,
)
from megatron_opd.config import ModelConfig, OPDConfig, dump_yaml
from megatron_opd.data.prompts import PromptDataset, load_train_dataset
from megatron_opd.data.sampler import PromptBatch, PromptSampler
from megatron_opd.data.tokenizer import load_tokenizer
from megatron_opd.loss.metrics import position_bucket_scalars
from megatron_opd.model.builders import build_model_chunks, student_model_config
from megatron_opd.model.hf_conversion.live import load_hf_weights
from megatron_opd.parallel.state import ParallelInfo, initialize_parallel
from megatron_opd.rollout.engine import RolloutEngine, build_rollout_engine
from megatron_opd.rollout.types import RolloutResult
from megatron_opd.teacher.factory import build_teacher_scorer
from megatron_opd.teacher.scorer import TeacherScorer, TeacherScores
from megatron_opd.teacher.vocab import check_teacher_student_vocab
from megatron_opd.training import checkpoint as ckpt
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.handover import HandoverGroups, hand_over
from megatron_opd.training.local_rollouts import (
    hand_over_local,
    local_share,
    merge_rollout_stats,
    raw_rollout_stats,
    replica_seed,
)
from megatron_opd.training.logger import RunLogger
from megatron_opd.training.optimizer import TrainingObjects, setup_training
from megatron_opd.training.preflight import check_run_inputs
from megatron_opd.training.step import StepResult, TrainStep
from megatron_opd.training.weight_sync import TrainerWeightSync, stage_sync_address
from megatron_opd.utils.errors import OPDError
from megatron_opd.utils.seeding import derive_seed, evaluation_seed

logger = logging.getLogger(__name__)


class NonFiniteError(OPDError, RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient; the run stops, the last checkpoint is intact."""


@dataclass
class Run:
    """Everything a run holds. ``engine``/``teacher`` exist on the rollout leaders only: rank 0, or with
    rollout.engine_ranks 'data_parallel' every data-parallel replica's TP = PP = CP rank 0."""

    cfg: OPDConfig
    info: ParallelInfo
    model_cfg: ModelConfig
    training: TrainingObjects
    train_step: TrainStep
    schedule: HorizonSchedule
    dataset: PromptDataset
    sampler: PromptSampler
    tokenizer: Any
    logger: RunLogger
    total_steps: int
    start_step: int = 0
    engine: RolloutEngine | None = None
    teacher: TeacherScorer | None = None
    teacher_engine: RolloutEngine | None = None
    nonfinite_streak: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    servers: list[Any] = field(default_factory=list)  # SGLang servers this run launched (rank 0)
    weight_sync: TrainerWeightSync | None = None  # every rank: its part in sending weights to the engine
    # this rank drives a rollout engine (and the teacher unless it is in the step)
    rollout_leader: bool = False

    @property
    def is_controller(self) -> bool:
        return self.info.rank == 0

    @property
    def local_engines(self) -> bool:
        """Every data-parallel replica generates its own share (rollout.engine_ranks 'data_parallel')."""
        return self.cfg.rollout.engine_ranks == "data_parallel"


# ----------------------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------------------
def setup_run(cfg: OPDConfig) -> Run:
    """Initialise the layout, build the student (from HF weights), optimizer, engines, data and schedule,
    then resume from ``checkpoint.load`` if it holds a checkpoint."""
    info = initialize_parallel(cfg.parallel, cfg.train.seed)
    cfg.check_world_size(info.world_size)
    check_run_inputs(cfg)  # model directories, TP/PP against config.json, output folders: before any step
    # The architecture comes from the checkpoint's config.json; how it is run comes from the model section.
    model_cfg = student_model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model.hf_path)
    if cfg.teacher.hf_path is not None:
        check_teacher_student_vocab(
            cfg.model.hf_path, cfg.teacher.hf_path, cfg.teacher.allow_vocab_padding_mismatch
        )

    dataset = load_train_dataset(cfg.train, cfg.rollout, tokenizer)
    sampler = PromptSampler(
        len(dataset), cfg.train.global_batch_size, seed=cfg.train.seed, epochs=cfg.train.epochs
    )
    total = (
        sampler.total_steps
        if cfg.train.train_steps is None
        else min(cfg.train.train_steps, sampler.total_steps)
    )

    chunks = build_model_chunks(model_cfg, sequence_parallel=cfg.parallel.sequence_parallel)
    load_hf_weights(chunks, cfg.model.hf_path, model_cfg, tp_group=mpu.get_tensor_model_parallel_group())
    training = setup_training(chunks, cfg.optimizer, total_steps=total)
    vocab_size = min(len(tokenizer), model_cfg.vocab_size)
    in_step_teacher = None
    if cfg.teacher.backend == "megatron":  # every rank holds its shard of the teacher, forward-only
        from megatron_opd.teacher.megatron import MegatronTeacher

        in_step_teacher = MegatronTeacher.build(
            cfg.teacher,
            model_cfg,
            vocab_size=vocab_size,
            topk=cfg.teacher.topk if cfg.loss.topk_kl_coef > 0 else 0,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
    train_step = TrainStep(
        training.model,
        training.optimizer,
        training.scheduler,
        cfg.loss,
        # Sampling and scoring use the tokenizer's vocabulary; embedding rows past it (Qwen pads 151,665 to
        # 151,936) are excluded from the trainer's softmax too, so all three normalise over the same tokens.
        vocab_size=vocab_size,
        teacher=in_step_teacher,
        share_prompts=cfg.train.share_prompts,
    )
    schedule = build_horizon_schedule(cfg.horizon, cfg.rollout.max_response_length)
    log_dir = cfg.logging.log_dir or cfg.checkpoint.save
    tb_dir = cfg.logging.tensorboard_dir or (os.path.join(log_dir, "tensorboard") if log_dir else None)
    run_logger = RunLogger(
        log_dir=log_dir,
        tensorboard_dir=tb_dir,
        enabled=info.rank == 0,
        progress_bar=cfg.logging.progress_bar,
        total_steps=total,
    )
    run = Run(
        cfg, info, model_cfg, training, train_step, schedule, dataset, sampler, tokenizer, run_logger, total
    )
    run.rollout_leader = info.rank == 0
    if run.local_engines:
        run.rollout_leader = info.tp_rank == info.pp_rank == mpu.get_context_parallel_rank() == 0
    if run.rollout_leader:
        _build_engines(run)
    if info.rank == 0:
        if log_dir:
            with open(os.path.join(log_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(dump_yaml(cfg))
        run_logger.text(
            f"megatron-opd: world {info.world_size} (TP {info.tp_size}, PP {info.pp_size}, DP {info.dp_size}, "
            f"{info.backend}); {len(dataset)} prompts ({dataset.num_too_long} over max_prompt_length skipped); "
            f"{total} steps; horizon {schedule_summary(cfg.horizon)}; loss impl {cfg.loss.impl}"
        )
    _build_weight_sync(run)
    _resume(run)
    sync_weights(run)  # the engine serves exactly the trainer's weights from the first rollout on
    return run


def _build_weight_sync(run: Run) -> None:
    """Every rank's part in the weight sync; the servers' URLs (launched ones known on rank 0 only) go to all."""
    cfg = run.cfg
    urls = [list(cfg.rollout.sglang_urls)]
    if run.info.world_size > 1 and cfg.rollout.backend == "sglang":
        dist.broadcast_object_list(urls, src=0)  # a few strings, once
    run.weight_sync = TrainerWeightSync(
        cfg.rollout,
        run.info,
        model_chunks=run.training.model,
        model_cfg=run.model_cfg,
        tp_group=mpu.get_tensor_model_parallel_group(),
        cp_rank=mpu.get_context_parallel_rank(),
        engine=run.engine,
        urls=urls[0],
        hf_path=cfg.model.hf_path,
        weight_sync_dir=_weight_sync_dir(cfg),
        timeout_s=cfg.rollout.request_timeout_s,
    )


def _weight_sync_dir(cfg: OPDConfig) -> str:
    return os.path.join(cfg.checkpoint.save or ".", "weight_sync")


def _build_engines(run: Run) -> None:
    cfg = run.cfg
    if cfg.rollout.launch_server or cfg.teacher.launch_server:
        _launch_servers(run)
        cfg = run.cfg
    # In-process engines share the trainer's CUDA device in the student's dtype; fp32 on CPU (logprob parity).
    from megatron_opd.rollout.engine import embedded_engine_placement

    cuda = torch.cuda.is_available()
    engine_device, engine_dtype = embedded_engine_placement(
        cfg.model.params_dtype, cuda, torch.cuda.current_device() if cuda else 0
    )
    run.engine = build_rollout_engine(
        cfg.rollout,
        hf_path=cfg.model.hf_path,
        dtype=engine_dtype,
        device=engine_device,
        weight_sync_dir=_weight_sync_dir(cfg),
        master_address=(
            stage_sync_address(cfg.rollout, 0, run.info.pp_size, cfg.rollout.sglang_urls)
            if cfg.rollout.backend == "sglang"
            else "127.0.0.1"
        ),
    )
    if cfg.teacher.backend != "megatron":  # the Megatron teacher lives in the train step, on every rank
        run.teacher = build_teacher_scorer(
            cfg.teacher,
            dtype=engine_dtype,
            device=engine_device,
            max_concurrency=cfg.rollout.max_concurrency,
            request_timeout_s=cfg.rollout.request_timeout_s,
            max_retries=cfg.rollout.max_retries,
        )
    if not run.is_controller:  # a data-parallel replica's own engine: no evaluation engines
        return
    if cfg.eval.eval_teacher and cfg.teacher.backend in ("embedded", "megatron"):
        from megatron_opd.rollout.embedded import EmbeddedEngine

        run.teacher_engine = EmbeddedEngine.from_hf_dir(
            cfg.teacher.hf_path, dtype=engine_dtype, device=engine_device
        )
    elif cfg.eval.eval_teacher:  # the teacher's servers generate its evaluation rollouts (no weight sync)
        from megatron_opd.rollout.sglang_engine import SGLangEngine

        run.teacher_engine = SGLangEngine(run.teacher.client)


def _launch_servers(run: Run) -> None:
    """Start the SGLang servers ``launch_server`` asks for (concurrently) and point the config at their URLs."""
    import atexit
    import dataclasses
    import threading

    from megatron_opd.rollout.placement import make_launched_servers
    from megatron_opd.rollout.sglang_server import SGLangServer

    cfg = run.cfg
    wanted = [("rollout", cfg.rollout, cfg.model.hf_path), ("teacher", cfg.teacher, cfg.teacher.hf_path)]
    servers = make_launched_servers(
        [(role, section.launch_args, path) for role, section, path in wanted if section.launch_server],
        params_dtype=cfg.model.params_dtype,
        log_dir=run.logger.log_dir,  # logging.log_dir, else checkpoint.save (setup_run)
    )
    run.servers = list(servers.values())
    for srv in run.servers:
        atexit.register(srv.stop)  # also on a crash; stop() is idempotent
    errors: list[BaseException] = []

    def start(srv: SGLangServer) -> None:
        try:
            srv.start(timeout_s=600)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(srv,)) for srv in run.servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        close(run)
        raise errors[0]
    for role, srv in servers.items():
        run.logger.text(f"launched SGLang {role} server {srv.url} for {srv.model_path}")
        section = dataclasses.replace(getattr(cfg, role), launch_server=False, sglang_urls=[srv.url])
        cfg = dataclasses.replace(cfg, **{role: section})
    run.cfg = cfg


def close(run: Run) -> None:
    """End of a run: leave the weight-sync groups with the servers and stop the servers this run launched."""
    if run.weight_sync is not None:
        try:
            run.weight_sync.close()  # a later stage's own group (rank 0's is the engine's, below)
        except Exception as e:  # noqa: BLE001 - a server already gone must not fail a finished run
            logger.warning("closing the weight-sync group failed: %s", e)
    sync = getattr(run.engine, "weight_sync", None)
    if sync is not None and hasattr(sync, "close"):
        try:
            sync.close()
        except Exception as e:  # noqa: BLE001 - a server already gone must not fail a finished run
            logger.warning("closing the weight-sync group failed: %s", e)
    for srv in run.servers:
        srv.stop()
    run.servers = []


def _resume(run: Run) -> None:
    cfg = run.cfg
    if not cfg.checkpoint.load:
        return
    from megatron_opd.config.base import fail

    if not os.path.isdir(cfg.checkpoint.load):
        fail(
            "checkpoint.load",
            cfg.checkpoint.load,
            "an existing checkpoint directory (this path does not exist or is not a directory; check for a typo, "
            "or drop checkpoint.load to start from the initial weights)",
        )
    state = ckpt.load_checkpoint(
        cfg.checkpoint.load,
        run.training.model,
        run.training.optimizer,
        run.training.scheduler,
        load_optimizer=cfg.checkpoint.load_optimizer,
    )
    if state is None:
        if not cfg.checkpoint.allow_empty_load:
            fail(
                "checkpoint.load",
                cfg.checkpoint.load,
                "a directory holding a complete checkpoint (iter_XXXXXXX); this one holds none. To start from the "
                "initial weights in it (a run that resumes itself), set checkpoint.allow_empty_load=true",
            )
        run.logger.text(f"no checkpoint under {cfg.checkpoint.load}: starting from the initial weights")
        return
    trainer = state["trainer"]
    run.sampler.load_state_dict(trainer["sampler"])
    run.schedule.load_state_dict(trainer["horizon"])
    run.start_step = int(state["iteration"])
    run.nonfinite_streak = int(trainer.get("nonfinite_streak", 0))
    run.logger.text(f"resumed from {cfg.checkpoint.load} at step {run.start_step}")


# ----------------------------------------------------------------------------------------------------------
# the phases of a step
# ----------------------------------------------------------------------------------------------------------
def _wants_student_topk(cfg: OPDConfig) -> bool:
    """Whether the rollout engine must return the student's top-K ids (the Megatron teacher's loss finds them)."""
    return (
        cfg.loss.topk_kl_coef > 0
        and cfg.teacher.topk > 0
        and cfg.teacher.topk_strategy == "student"
        and cfg.teacher.backend != "megatron"
    )


def rollout_phase_steps(run: Run, step: int) -> int:
    """How many steps the rollout phase starting at ``step`` samples for: up to the next multiple of
    ``train.steps_per_rollout`` (phases start at its multiples, also after a resume), not past the run's end."""
    k = run.cfg.train.steps_per_rollout
    return min(k - step % k, run.total_steps - step)


def generate_rollouts(
    run: Run, batches: list[PromptBatch], window: HorizonWindow, step: int
) -> list[RolloutResult | None]:
    """Rollout leaders: ``n_samples_per_prompt`` rollouts per prompt of each of ``batches`` (the steps of one rollout
    phase, ``train.steps_per_rollout``), cut at the horizon's generation length, in one engine call; one result
    per batch. Rank 0 generates whole batches, or each data-parallel replica's leader its share of each batch
    (``local_engines``). Other ranks get Nones."""
    if not run.rollout_leader:
        return [None] * len(batches)
    cfg = run.cfg
    seed = derive_seed(cfg.train.seed, step)
    shares = [list(batch.indices) for batch in batches]
    if run.local_engines:  # this replica's contiguous share of every batch, and its own stream
        seed = replica_seed(seed, run.info.dp_rank)
        spans = [local_share(len(ix), run.info.dp_rank, run.info.dp_size) for ix in shares]
        shares = [ix[span.start : span.stop] for ix, span in zip(shares, spans, strict=True)]
    result = run.engine.generate(
        [run.dataset[i].prompt_ids for indices in shares for i in indices],
        n=cfg.train.n_samples_per_prompt,
        max_new_tokens=window.generate,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        seed=seed,
        topk=cfg.teacher.topk if _wants_student_topk(cfg) else 0,
    )
    result.validate()
    out, start = [], 0
    for indices in shares:
        out.append(result.prompts(start, start + len(indices)))
        start += len(indices)
    return out


def score_rollouts(run: Run, rollouts: RolloutResult | None) -> TeacherScores | None:
    """Rollout leaders: the teacher's logprobs of every response token (and top-K terms when the loss uses them).

    None with teacher.backend 'megatron': that teacher scores inside the train step."""
    if not run.rollout_leader or run.cfg.teacher.backend == "megatron":
        return None
    cfg = run.cfg
    topk = cfg.teacher.topk if cfg.loss.topk_kl_coef > 0 else 0
    return run.teacher.score(
        rollouts.prompt_ids,
        rollouts.response_ids,
        topk=topk,
        strategy=cfg.teacher.topk_strategy,
        student_topk_ids=rollouts.topk_ids if topk and cfg.teacher.topk_strategy == "student" else None,
    )


def make_micro_batches(
    run: Run, rollouts: RolloutResult | None, scores: TeacherScores | None, window: HorizonWindow
) -> tuple[list[OPDBatch], dict[str, float]]:
    """Hand rank 0's scored rollouts over as tensors (``scores`` None: the step scores, teacher.backend
    'megatron'), or each replica's own (``local_engines``); return this rank's micro-batches and the step's
    rollout statistics."""
    common = dict(micro_batch_size=run.cfg.train.micro_batch_size, pad_id=run.tokenizer.pad_token_id or 0)
    groups = HandoverGroups.from_mpu()
    if run.local_engines:
        return hand_over_local(rollouts, scores, window, groups, leader=run.rollout_leader, **common)
    extra = rollout_stats(rollouts, window) if run.is_controller else None
    return hand_over(rollouts, scores, window, groups, extra=extra, **common)


def rollout_stats(rollouts: RolloutResult, window: HorizonWindow) -> dict[str, float]:
    """Response lengths and how often the horizon (rather than EOS) ended a response."""
    return merge_rollout_stats([raw_rollout_stats(rollouts)], window)


def observe_horizon(run: Run, step: int, result: StepResult) -> None:
    """Feed the step's per-position signal to the schedule (only the adaptive one uses it)."""
    if result.skipped:
        return
    if run.cfg.horizon.adaptive_signal == "kl" and run.cfg.loss.topk_kl_coef > 0:
        signal = result.position_topk_kl_sum
    else:
        signal = -result.position_log_ratio_sum  # the k1 estimate of KL(student || teacher) per token
    run.schedule.observe(step, signal, result.position_count)


def check_finite(run: Run, step: int, result: StepResult) -> None:
    """Count consecutive skipped (non-finite) steps; stop with a clear message after too many."""
    if not result.skipped:
        run.nonfinite_streak = 0
        return
    run.nonfinite_streak += 1
    limit = run.cfg.train.max_consecutive_nonfinite_steps
    run.logger.text(f"step {step}: skipped ({result.skip_reason}); {run.nonfinite_streak}/{limit} in a row")
    if run.nonfinite_streak >= limit:
        raise NonFiniteError(
            f"{limit} consecutive steps had a {result.skip_reason} (last at step {step}); weights were not updated "
            "by any of them and no checkpoint was written from them. Lower optimizer.lr, check the teacher's "
            "logprobs and the data, then resume with --checkpoint.load from the last checkpoint."
        )


# ----------------------------------------------------------------------------------------------------------
# weights, evaluation, checkpoints
# ----------------------------------------------------------------------------------------------------------
def sync_weights(run: Run) -> dict[str, float]:
    """Load the trainer's current weights into the rollout engine (collective); rank 0 gets the sync's
    ``sync/seconds`` and ``sync/gb_per_s``, the other ranks {}."""
    return run.weight_sync.sync()


def evaluate(run: Run, step: int, *, teacher: bool = False) -> dict[str, float]:
    """Full-rollout evaluation on rank 0 with the configured sets; scalars for the logs."""
    if not run.is_controller or not run.cfg.eval.datasets:
        return {}
    from megatron_opd.eval.evaluator import evaluate_sets

    engine = run.teacher_engine if teacher else run.engine
    cfg = run.cfg
    results = evaluate_sets(
        cfg.eval,
        engine.generate,
        run.tokenizer,
        max_response_length=cfg.rollout.max_response_length,
        seed=evaluation_seed(cfg.train.seed, step),
        apply_chat_template=cfg.train.apply_chat_template,
    )
    out: dict[str, float] = {}
    for res in results.values():
        out.update(res.metrics("eval_teacher" if teacher else "eval"))
    who = "teacher" if teacher else "student"
    summary = ", ".join(f"{name} avg@{r.n_samples} {r.avg:.3f}" for name, r in results.items())
    run.logger.text(f"eval ({who}, step {step}): {summary}")
    return out


def save(run: Run, iteration: int) -> str | None:
    """A complete checkpoint after ``iteration`` steps (collective)."""
    root = run.cfg.checkpoint.save
    if not root:
        return None
    trainer_state = {
        "sampler": run.sampler.state_dict(),
        "horizon": run.schedule.state_dict(),
        "nonfinite_streak": run.nonfinite_streak,
    }
    path = ckpt.save_checkpoint(
        root,
        iteration,
        run.training.model,
        run.training.optimizer,
        run.training.scheduler,
        trainer_state,
        keep_last=run.cfg.checkpoint.keep_last,
    )
    run.logger.text(f"saved {path}")
    return path


def step_scalars(
    run: Run, step: int, result: StepResult, stats: dict[str, float], window: HorizonWindow | None = None
) -> dict[str, float]:
    """The step's scalars: train metrics, rollout statistics, horizon state (of ``window``, the one the step used;
    default the schedule's at ``step``), throughput, and the KL and log-ratio by response-position bucket
    (``opd_by_position/*``, buckets of [0, T_max): see ``loss/metrics.py``)."""
    out = {**result.scalars(), **stats, **run.schedule.describe(step, window)}
    has_topk = run.cfg.loss.topk_kl_coef > 0 and math.isfinite(result.topk_kl_mean)
    out.update(
        position_bucket_scalars(
            result.position_log_ratio_sum,
            result.position_count,
            position_topk_kl_sum=result.position_topk_kl_sum if has_topk else None,
            max_length=run.cfg.rollout.max_response_length,
            num_buckets=run.cfg.logging.kl_position_buckets,
        )
    )
    out.update(run.logger.end_step())  # this step's phase seconds, whether or not the step is logged
    for phase, key in (("rollout", "rollout/generated_tokens"), ("train", "train/tokens")):
        sec = out.get(f"time/{phase}_s", 0.0)
        if sec > 0 and key in out:
            out[f"throughput/{phase}_tokens_per_s"] = out[key] / sec
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not math.isnan(v)}
