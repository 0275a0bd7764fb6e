"""Rollouts on every data-parallel rank (``rollout.engine_ranks: data_parallel``).

Why it exists: with one in-process engine on rank 0, the rollout phase is serial: rank 0 generates (and scores)
the whole step while every other rank waits, so adding data-parallel ranks shortens only the train phase. Here
each data-parallel replica's leader (its TP = PP = CP rank 0) holds an engine and generates its own contiguous
share of the step's prompts: the replicas generate at the same time, and each share is already where it is
trained, so nothing crosses between replicas but a few statistics. It is the colocated layout of verl's hybrid
engine, for the embedded engine (SGLang servers already serve every rank's requests).

One step, on every rank:

1. the leader generates, scores and builds its micro-batches (as ``handover._build``), then posts its raw
   statistics and error message (a few numbers, or a string) to the store;
2. every rank waits on the store (outside any collective, as in ``handover``) until every replica's leader has
   posted, then reads them all: every rank raises together if any replica failed, and the step's statistics
   cover all replicas. No collective is entered before that, so neither a slow replica nor rank 0's evaluation
   between two steps can run into a collective timeout;
3. inside each replica, the leader broadcasts a header, the [b, 2] lengths and the flat buffers down its
   pipeline group, then each stage's TP = CP rank 0 inside its TP x CP group (as ``handover`` does).

The replicas' micro-batches have the shapes the controller path would give them (a contiguous share of the
prompts, ``n`` samples each, grouped by prompt), so the objective is the same; only the random streams differ
(replica 0 uses the controller's seed, replica d > 0 a seed derived from it): greedy rollouts train identically.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.rollout.types import RolloutResult
from megatron_opd.teacher.scorer import TeacherScores
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.handover import (
    HandoverGroups,
    _allocate,
    _broadcast,
    _build,
    _check_scored,
    _lengths,
    _plan,
    wait_for_count,
)
from megatron_opd.utils.seeding import derive_seed

__all__ = [
    "hand_over_local",
    "local_share",
    "merge_rollout_stats",
    "raw_rollout_stats",
    "replica_seed",
]

_KEY = "megatron_opd/local_handover"


def local_share(n_prompts: int, dp_rank: int, dp_size: int) -> range:
    """The prompts (positions in the step's batch) replica ``dp_rank`` generates: its contiguous share, the one
    ``OPDBatch.shard`` gives it on the controller path."""
    if n_prompts % dp_size:
        raise ValueError(f"{n_prompts} prompts do not split over {dp_size} data-parallel ranks")
    m = n_prompts // dp_size
    return range(dp_rank * m, (dp_rank + 1) * m)


def replica_seed(step_seed: int, dp_rank: int) -> int:
    """Replica 0 samples with the controller's seed (one replica reproduces the controller path exactly)."""
    return step_seed if dp_rank == 0 else derive_seed(step_seed, dp_rank)


def raw_rollout_stats(rollouts: RolloutResult) -> dict[str, float]:
    """Sums and maxima of one replica's rollouts, to be merged across replicas (``merge_rollout_stats``)."""
    lengths = [len(r) for r in rollouts.response_ids]
    return {
        "n": float(len(lengths)),
        "tokens": float(sum(lengths)),
        "max": float(max(lengths, default=0)),
        "cut": float(sum(reason == "length" for reason in rollouts.finish_reasons)),
    }


def merge_rollout_stats(parts: list[dict[str, float]], window: HorizonWindow) -> dict[str, float]:
    """The step's rollout statistics over every replica: the keys of ``run.rollout_stats``."""
    n = sum(p["n"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    return {
        "rollout/response_length_mean": tokens / max(n, 1.0),
        "rollout/response_length_max": max((p["max"] for p in parts), default=0.0),
        "rollout/truncation_rate": sum(p["cut"] for p in parts) / max(n, 1.0),
        "rollout/generated_tokens": tokens,
        "rollout/distilled_window": float(window.length),
    }


def hand_over_local(
    rollouts: RolloutResult | None,
    scores: TeacherScores | None,
    window: HorizonWindow,
    groups: HandoverGroups,
    *,
    micro_batch_size: int,
    pad_id: int = 0,
    leader: bool,
    heartbeat_s: float = 60.0,
) -> tuple[list[OPDBatch], dict[str, float]]:
    """This rank's micro-batches of its replica's own rollouts, and the step's rollout statistics.

    A replica's leader (``leader``) passes its share's ``rollouts`` and ``scores`` (None when the step scores:
    teacher.backend 'megatron'); its other ranks pass None. Every rank waits on the store until every leader has
    posted (module doc). Micro-batch shapes: tokens [b, L] int64, teacher_logprobs [b, R] fp32, top-K
    [b, R, K], as ``handover``.
    """
    multi = dist.is_initialized() and dist.get_world_size() > 1
    failure: Exception | None = None
    batches: list[OPDBatch] = []
    flats: list[torch.Tensor] = []
    raw: dict[str, float] | None = None
    header = torch.zeros(3, dtype=torch.long)
    lengths = torch.empty((0, 2), dtype=torch.long)
    if leader:
        if rollouts is None:
            raise ValueError("local hand-over: a replica's leader must pass its rollouts")
        try:
            K = _check_scored(rollouts, scores)
            lengths = _lengths(rollouts)
            plan = _plan(lengths, range(len(rollouts)), micro_batch_size)
            flats, batches = _build(rollouts, scores, window, plan, lengths, K, pad_id)
            raw = raw_rollout_stats(rollouts)
            header = torch.tensor([len(rollouts), K, scores is not None], dtype=torch.long)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling every rank
            failure = e
    if not multi:
        if failure is not None:
            raise failure
        return batches, merge_rollout_stats([raw], window)

    store = dist.distributed_c10d._get_default_store()
    n = store.add(f"{_KEY}/taken/{dist.get_rank()}", 1)  # this hand-over's number, the same on every rank
    step_key = f"{_KEY}/{n}"
    if leader:
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        store.set(f"{step_key}/{groups.dp_rank}", pickle.dumps((raw, message)))
        store.add(f"{step_key}/posted", 1)
    what = f"every data-parallel replica's rollouts (hand-over {n})"
    wait_for_count(store, f"{step_key}/posted", groups.dp_size, heartbeat_s=heartbeat_s, what=what)
    parts = [pickle.loads(store.get(f"{step_key}/{d}")) for d in range(groups.dp_size)]
    if dist.get_rank() == 0 and n > 1:
        # Every rank has read hand-over n - 1: each leader posted n only after its step n - 1, whose gradient
        # all-reduce every rank joins after reading n - 1. Its keys can go.
        for d in range(groups.dp_size):
            store.delete_key(f"{_KEY}/{n - 1}/{d}")
        store.delete_key(f"{_KEY}/{n - 1}/posted")
    if failure is not None:
        raise failure
    errors = [(d, msg) for d, (_, msg) in enumerate(parts) if msg is not None]
    if errors:
        d, msg = errors[0]
        raise RuntimeError(f"local hand-over: data-parallel replica {d} could not build its batch: {msg}")
    stats = merge_rollout_stats([raw_part for raw_part, _ in parts], window)

    for group in (groups.pp, groups.tp_cp):
        if group is None:
            continue
        _broadcast([header], group)
        B, K, teacher = header.tolist()
        if lengths.shape[0] != B:
            lengths = torch.empty((B, 2), dtype=torch.long)
        _broadcast([lengths], group)
        if not flats:  # a receiving rank: the same buffers, then their contents
            flats, batches = _allocate(
                _plan(lengths, range(B), micro_batch_size), lengths, K, window, teacher=bool(teacher)
            )
        _broadcast(flats, group)
    return batches, stats
