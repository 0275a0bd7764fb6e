"""Hand-over of rank 0's scored rollouts to the training ranks, as tensors.

Why it exists: rank 0 generates and scores; every rank then needs its data-parallel share, cut into
micro-batches. Pickling nested Python lists to every rank (about 126M numbers a step at the paper's shape) and
padding them on each rank costs minutes a step on a CPU; the waiting ranks would also sit inside a collective
whose timeout a long rollout phase can exceed. Here rank 0 builds each rank's micro-batches once, straight
into tensors, and only tensors cross a process boundary, each going only where it is needed:

1. every rank waits on the default store (not in a collective) until rank 0 has built the tensors;
2. rank 0 broadcasts a small int64 header (batch size, top-K width) and the [B, 2] prompt/response lengths,
   from which every rank derives every micro-batch's padded shape; the rollout statistics follow as a tiny
   object (with rank 0's error message, if building failed, so that every rank raises instead of waiting);
3. rank 0 sends data-parallel rank d its contiguous share (to d's leader: TP = PP = CP rank 0), point to point
   inside rank 0's data-parallel group: a scatter with per-rank shapes. A share travels as one flat buffer per
   field (tokens, teacher logprobs, top-K ids, top-K logprobs) holding its micro-batches back to back, each
   padded only to its own real length; the micro-batches are views into those buffers;
4. each leader broadcasts the share down its pipeline group, then each stage's TP = CP rank 0 broadcasts it
   inside its TP x CP group.

The result on every rank is bit-identical to the old path, ``OPDBatch.from_lists(...).shard(dp_rank,
dp_size).split(...)`` (tests/distributed/test_handover_ranks.py checks it at DP=4, DP=2 x TP=2, DP=2 x PP=2
and TP=2 x PP=2, with and without top-K).

Waiting: a rank polls a counter in the default store (``torch.distributed``'s rendezvous store) with a short,
growing sleep and logs a heartbeat every ``heartbeat_s``; no collective is entered until rank 0 has posted, so
``parallel.distributed_timeout_minutes`` bounds only the transfer, never the rollout phase. A rank 0 that dies
makes the store unreachable (or torchrun stops the job), so a waiter does not wait forever on a dead controller.
Hand-over n is ready when rank 0's ``posted`` counter reaches n; each waiter learns its own n by incrementing
its ``taken/<rank>`` counter, so no process-local state has to agree across ranks.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.rollout.types import RolloutResult
from megatron_opd.teacher.scorer import TeacherScores
from megatron_opd.training.batch import OPDBatch

__all__ = ["HandoverGroups", "build_micro_batches", "hand_over", "wait_for_controller"]

logger = logging.getLogger(__name__)

_KEY = "megatron_opd/handover"
_POLL_MIN_S = 0.001  # a rank that arrives just before rank 0 posts should not add a long sleep to the step
_POLL_MAX_S = 0.05
# Poll every _POLL_MIN_S this long first: the usual wait (replicas a few ms apart) ends within it.
_FAST_POLL_S = 0.25


@dataclass(frozen=True)
class HandoverGroups:
    """The process groups one hand-over uses, from this rank's point of view.

    ``dp``: rank 0's data-parallel group (the ranks with TP = PP = CP rank 0, one per data-parallel rank), on
    those ranks only; else None (and None when there is one data-parallel rank). Its group rank 0 is rank 0.
    ``pp``: this rank's pipeline group, on ranks with TP = CP rank 0 when there are several stages; else None.
    Its group rank 0 is the first stage. ``tp_cp``: this rank's tensor x context-parallel group when it has
    several ranks; else None. Its group rank 0 is TP = CP rank 0. ``world``: the group every rank is in (None:
    the default group); the header, lengths and statistics are broadcast over it.
    """

    dp_rank: int
    dp_size: int
    dp: dist.ProcessGroup | None
    pp: dist.ProcessGroup | None
    tp_cp: dist.ProcessGroup | None
    world: dist.ProcessGroup | None = None

    @classmethod
    def from_mpu(cls) -> HandoverGroups:
        """The groups of Megatron's current layout (``megatron.core.parallel_state`` must be initialised)."""
        from megatron.core import parallel_state as mpu

        tp, cp, pp = (
            mpu.get_tensor_model_parallel_rank(),
            mpu.get_context_parallel_rank(),
            mpu.get_pipeline_model_parallel_rank(),
        )
        dp_size = mpu.get_data_parallel_world_size()
        tp_cp_size = mpu.get_tensor_model_parallel_world_size() * mpu.get_context_parallel_world_size()
        groups = cls(
            dp_rank=mpu.get_data_parallel_rank(),
            dp_size=dp_size,
            dp=mpu.get_data_parallel_group() if dp_size > 1 and tp == cp == pp == 0 else None,
            pp=mpu.get_pipeline_model_parallel_group()
            if mpu.get_pipeline_model_parallel_world_size() > 1 and tp == cp == 0
            else None,
            tp_cp=mpu.get_tensor_and_context_parallel_group() if tp_cp_size > 1 else None,
        )
        # The sender of each stage is its group rank 0; a rank order where that is not the rank holding the
        # data would silently hand over wrong shares, so refuse it.
        if groups.dp is not None and (
            dist.get_global_rank(groups.dp, 0) != 0 or dist.get_rank(groups.dp) != groups.dp_rank
        ):
            raise RuntimeError(
                "hand-over: rank 0's data-parallel group is not ordered by data-parallel rank from rank 0"
            )
        if groups.pp is not None and (dist.get_rank(groups.pp) == 0) != (pp == 0):
            raise RuntimeError(
                "hand-over: the first pipeline stage is not group rank 0 of its pipeline group"
            )
        if groups.tp_cp is not None and (dist.get_rank(groups.tp_cp) == 0) != (tp == cp == 0):
            raise RuntimeError("hand-over: TP = CP rank 0 is not group rank 0 of its TP x CP group")
        return groups


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_rows(x: Any, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``n`` rows of one sequence's [R_b][K] values as a [n, k] tensor, without a per-token loop."""
    if isinstance(x, torch.Tensor | np.ndarray):
        return torch.as_tensor(x[:n]).reshape(n, k).to(dtype)
    np_dtype = np.int64 if dtype == torch.long else np.float32
    flat = np.fromiter(itertools.chain.from_iterable(x[:n]), dtype=np_dtype, count=n * k)
    return torch.from_numpy(flat.reshape(n, k))


def _as_vector(x: Any, n: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor | np.ndarray):
        return torch.as_tensor(x[:n]).to(dtype)
    np_dtype = np.int64 if dtype == torch.long else np.float32
    return torch.from_numpy(np.fromiter(itertools.islice(x, n), dtype=np_dtype, count=n))


def _lengths(rollouts: RolloutResult) -> torch.Tensor:
    """[B, 2] int64: (prompt length, response length) of every sequence."""
    return torch.tensor(
        [[len(p), len(r)] for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)], dtype=torch.long
    ).reshape(-1, 2)


def _topk_width(topk_ids: Sequence, responses: Sequence[Sequence[int]]) -> int:
    """K as ``OPDBatch.from_lists`` reads it: from the first sequence with a response, else 1."""
    for x, r in zip(topk_ids, responses):
        if len(r):
            return int(torch.as_tensor(x[0]).numel()) if len(x) else 1
    return 1


def _plan(lengths: torch.Tensor, rows: range, micro_batch_size: int) -> list[tuple[range, int, int]]:
    """(rows, L, R) of each micro-batch of ``rows``, padded to its own real length as ``OPDBatch.split`` of
    ``OPDBatch.shard`` makes them (``len(rows) // micro_batch_size`` equal pieces)."""
    n = len(rows) // micro_batch_size
    if n < 1 or len(rows) % n:
        raise ValueError(f"cannot split a batch of {len(rows)} sequences into {n} equal micro-batches")
    m = len(rows) // n
    out = []
    for s in range(rows.start, rows.stop, m):
        P, R = lengths[s : s + m, 0], lengths[s : s + m, 1]
        out.append((range(s, s + m), max(int((P + R).max()), 1), max(int(R.max()), 1)))
    return out


def _allocate(
    plan: list[tuple[range, int, int]],
    lengths: torch.Tensor,
    K: int,
    window: HorizonWindow,
    teacher: bool = True,
) -> tuple[list[torch.Tensor], list[OPDBatch]]:
    """One flat buffer per field for a whole share (so it travels in one message per field), and the
    micro-batches as views into them: tokens [b, L] int64, teacher logprobs [b, R] fp32 (unless ``teacher`` is
    False: the step scores, teacher.backend 'megatron'), top-K [b, R, K]."""
    n_tok = sum(len(rows) * L for rows, L, _ in plan)
    n_resp = sum(len(rows) * R for rows, _, R in plan)
    flats = [torch.empty(n_tok, dtype=torch.long)]
    if teacher:
        flats.append(torch.empty(n_resp, dtype=torch.float32))
    if K:
        flats += [torch.empty(n_resp * K, dtype=torch.long), torch.empty(n_resp * K, dtype=torch.float32)]
    batches, o_tok, o_resp = [], 0, 0
    for rows, L, R in plan:
        b = len(rows)
        batches.append(
            OPDBatch(
                tokens=flats[0][o_tok : o_tok + b * L].view(b, L),
                prompt_lengths=lengths[rows.start : rows.stop, 0].clone(),
                response_lengths=lengths[rows.start : rows.stop, 1].clone(),
                teacher_logprobs=flats[1][o_resp : o_resp + b * R].view(b, R) if teacher else None,
                window=window,
                topk_ids=flats[-2][o_resp * K : (o_resp + b * R) * K].view(b, R, K) if K else None,
                teacher_topk_logprobs=flats[-1][o_resp * K : (o_resp + b * R) * K].view(b, R, K)
                if K
                else None,
            )
        )
        o_tok, o_resp = o_tok + b * L, o_resp + b * R
    return flats, batches


def _fill(
    batch: OPDBatch, rollouts: RolloutResult, scores: TeacherScores | None, rows: range, pad_id: int
) -> None:
    """Write sequences ``rows`` into a micro-batch's buffers, padding included (each byte written once: the
    top-K buffers are most of the bytes, and zeroing them first would cost as much as the copy)."""
    K = 0 if batch.topk_ids is None else batch.topk_ids.shape[-1]
    for j, (i, p, n) in enumerate(zip(rows, batch.prompt_lengths.tolist(), batch.response_lengths.tolist())):
        batch.tokens[j, :p] = _as_vector(rollouts.prompt_ids[i], p, torch.long)
        batch.tokens[j, p : p + n] = _as_vector(rollouts.response_ids[i], n, torch.long)
        batch.tokens[j, p + n :] = pad_id
        if batch.teacher_logprobs is not None:
            batch.teacher_logprobs[j, :n] = _as_vector(scores.logprobs[i], n, torch.float32)
            batch.teacher_logprobs[j, n:] = 0.0
        if K:
            if n:
                batch.topk_ids[j, :n] = _as_rows(scores.topk_ids[i], n, K, torch.long)
                batch.teacher_topk_logprobs[j, :n] = _as_rows(scores.topk_logprobs[i], n, K, torch.float32)
            batch.topk_ids[j, n:] = 0
            batch.teacher_topk_logprobs[j, n:] = 0.0


def _check_scored(rollouts: RolloutResult, scores: TeacherScores | None) -> int:
    """Validate what rank 0 hands over (the checks of ``OPDBatch.from_lists``); returns K (0 without top-K).
    ``scores`` None: the training step scores the rollouts itself (teacher.backend 'megatron')."""
    if len(rollouts.prompt_ids) != len(rollouts.response_ids):
        raise ValueError("prompts and responses must have one entry per rollout")
    if scores is None:
        return 0
    prompts, responses, teacher = rollouts.prompt_ids, rollouts.response_ids, scores.logprobs
    if not len(prompts) == len(responses) == len(teacher):
        raise ValueError("prompts, responses and teacher_logprobs must have one entry per rollout")
    for b, (r, t) in enumerate(zip(responses, teacher)):
        if len(t) < len(r):
            raise ValueError(f"rollout {b}: {len(t)} teacher logprobs for {len(r)} response tokens")
    if (scores.topk_ids is None) != (scores.topk_logprobs is None):
        raise ValueError("topk_ids and teacher_topk_logprobs go together (both or neither)")
    return 0 if scores.topk_ids is None else _topk_width(scores.topk_ids, responses)


def build_micro_batches(
    rollouts: RolloutResult,
    scores: TeacherScores | None,
    window: HorizonWindow,
    rows: range,
    micro_batch_size: int,
    pad_id: int = 0,
) -> list[OPDBatch]:
    """Sequences ``rows`` of scored rollouts as padded micro-batches, built straight from the engines' output.

    Equal to ``OPDBatch.from_lists(<all rollouts>).select(rows)`` split into ``len(rows) // micro_batch_size``
    pieces. Shapes per micro-batch: tokens [b, L] int64, lengths [b], teacher_logprobs [b, R] float32, top-K
    [b, R, K]. Per-sequence inputs are tensors as the engines return them (``RolloutResult``,
    ``TeacherScores``: copied, no conversion); lists (hand-built) are converted by numpy, no per-token Python
    loop, but that conversion costs rank 0 about 1.8 CPU s a step at the paper's shape (bench_handover.py).
    """
    K = _check_scored(rollouts, scores)
    lengths = _lengths(rollouts)
    return _build(rollouts, scores, window, _plan(lengths, rows, micro_batch_size), lengths, K, pad_id)[1]


def _build(rollouts, scores, window, plan, lengths, K, pad_id) -> tuple[list[torch.Tensor], list[OPDBatch]]:
    flats, batches = _allocate(plan, lengths, K, window, teacher=scores is not None)
    for (rows, _, _), batch in zip(plan, batches):
        _fill(batch, rollouts, scores, rows, pad_id)
    return flats, batches


def wait_for_count(store: dist.Store, key: str, target: int, *, heartbeat_s: float, what: str) -> None:
    """Block (outside any collective) until the store's counter ``key`` reaches ``target``.

    Polls every 1 ms for the first 0.25 s (data-parallel replicas reach the hand-over a few ms apart: a doubling
    sleep would overshoot such a wait by up to its own length, every step), then with a sleep doubling up to 50 ms,
    logging ``what`` every ``heartbeat_s`` seconds, so a long rollout (or evaluation) phase elsewhere shows up in
    the logs as waiting, not as a hang.
    """
    t0 = last = time.monotonic()
    sleep = _POLL_MIN_S
    while store.add(key, 0) < target:
        time.sleep(sleep)
        now = time.monotonic()
        if now - t0 >= _FAST_POLL_S:
            sleep = min(2 * sleep, _POLL_MAX_S)
        if now - last >= heartbeat_s:
            logger.info("waiting %.0f s for %s", now - t0, what)
            last = now


def wait_for_controller(store: dist.Store, rank: int, *, heartbeat_s: float = 60.0) -> int:
    """Block (outside any collective) until rank 0 has posted this rank's next hand-over; returns its number."""
    n = store.add(f"{_KEY}/taken/{rank}", 1)
    what = f"rank 0's rollouts (rank {rank}, hand-over {n})"
    wait_for_count(store, f"{_KEY}/posted", n, heartbeat_s=heartbeat_s, what=what)
    return n


def _post(store: dist.Store) -> None:
    store.add(f"{_KEY}/posted", 1)


def _broadcast(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Broadcast from group rank 0, in place."""
    device = _comm_device(group)
    for t in tensors:
        moved = t.to(device)
        dist.broadcast(moved, group=group, group_src=0)
        if moved.data_ptr() != t.data_ptr():
            t.copy_(moved)


def hand_over(
    rollouts: RolloutResult | None,
    scores: TeacherScores | None,
    window: HorizonWindow,
    groups: HandoverGroups,
    *,
    micro_batch_size: int,
    pad_id: int = 0,
    extra: dict[str, float] | None = None,
    heartbeat_s: float = 60.0,
) -> tuple[list[OPDBatch], dict[str, float] | None]:
    """This rank's micro-batches of rank 0's scored rollouts, and rank 0's ``extra`` (small scalars).

    Rank 0 passes ``rollouts``, ``scores`` (None when the step scores: teacher.backend 'megatron') and ``extra``;
    every other rank passes None and waits on the store
    (module doc). All ranks call it with the same ``window``, ``micro_batch_size`` and ``pad_id``. Returns
    what the old path returned, bit for bit: ``OPDBatch.from_lists(...).shard(dp_rank, dp_size)`` split into
    ``shard.size // micro_batch_size`` micro-batches (each padded to its own real length), and ``extra``.
    """
    world = dist.get_world_size(groups.world) if dist.is_initialized() else 1
    rank = dist.get_rank(groups.world) if dist.is_initialized() else 0
    if rank == 0 and rollouts is None:
        raise ValueError("hand-over: rank 0 must pass the rollouts")
    if world == 1:
        return build_micro_batches(
            rollouts, scores, window, range(len(rollouts)), micro_batch_size, pad_id
        ), extra

    store = dist.distributed_c10d._get_default_store()
    failure: Exception | None = None
    if rank == 0:
        try:
            K = _check_scored(rollouts, scores)
            lengths = _lengths(rollouts)
            plans = _plans(lengths, groups.dp_size, micro_batch_size)
            shares = [_build(rollouts, scores, window, plan, lengths, K, pad_id) for plan in plans]
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the waiting ranks
            failure, K = e, 0
        _post(store)
        header = torch.tensor([-1 if failure else len(rollouts), K, scores is not None], dtype=torch.long)
    else:
        wait_for_controller(store, rank, heartbeat_s=heartbeat_s)
        header = torch.empty(3, dtype=torch.long)

    # shapes first: every rank derives every micro-batch's padded shape from the [B, 2] lengths
    _broadcast([header], groups.world)
    B, K, teacher = header.tolist()
    box = [(extra, None if failure is None else f"{type(failure).__name__}: {failure}")]
    dist.broadcast_object_list(box, group=groups.world, group_src=0)
    extra, message = box[0]
    if message is not None:  # every rank stops here together instead of waiting for tensors that never come
        if failure is not None:
            raise failure
        raise RuntimeError(f"hand-over: rank 0 could not build the batch: {message}")
    if rank != 0:
        lengths = torch.empty((B, 2), dtype=torch.long)
    _broadcast([lengths], groups.world)
    if rank != 0:
        plans = _plans(lengths, groups.dp_size, micro_batch_size)
    flats, batches = (
        shares[0]
        if rank == 0
        else _allocate(plans[groups.dp_rank], lengths, K, window, teacher=bool(teacher))
    )

    if groups.dp is not None:  # rank 0 and the other data-parallel ranks' leaders
        device = _comm_device(groups.dp)
        if rank == 0:
            pending = [
                dist.isend(t.to(device), group=groups.dp, group_dst=d)
                for d in range(1, groups.dp_size)
                for t in shares[d][0]
            ]
            for work in pending:
                work.wait()
        else:
            for t in flats:
                moved = t.to(device)
                dist.recv(moved, group=groups.dp, group_src=0)
                if moved.data_ptr() != t.data_ptr():
                    t.copy_(moved)
    if groups.pp is not None:
        _broadcast(flats, groups.pp)
    if groups.tp_cp is not None:
        _broadcast(flats, groups.tp_cp)
    return batches, extra


def _plans(lengths: torch.Tensor, dp_size: int, micro_batch_size: int) -> list[list[tuple[range, int, int]]]:
    """Every data-parallel rank's micro-batch plan (its contiguous share, as ``OPDBatch.shard``)."""
    B = lengths.shape[0]
    if B % dp_size:
        raise ValueError(f"a batch of {B} sequences does not split over {dp_size} data-parallel ranks")
    m = B // dp_size
    return [_plan(lengths, range(d * m, (d + 1) * m), micro_batch_size) for d in range(dp_size)]
