"""Hand-over of rank 0's scored rollouts to the training ranks, as tensors.

Why it exists: rank 0 generates and scores; every rank then needs its data-parallel share as an ``OPDBatch``.
Pickling nested Python lists to every rank (about 126M numbers a step at the paper's shape) and padding them on
each rank costs tens of seconds; the waiting ranks would also sit inside a collective whose timeout a long
rollout phase can exceed. Here rank 0 pads each data-parallel share once, straight into tensors, and only
tensors cross a process boundary, each going only where it is needed:

1. every rank waits on the default store (not in a collective) until rank 0 has built the tensors;
2. rank 0 broadcasts a small int64 header (batch size, top-K width) and the [B, 2] prompt/response lengths,
   from which every rank derives every shard's padded shape; the rollout statistics follow as a tiny object;
3. rank 0 sends data-parallel rank d its contiguous share (d's leader: TP = PP = CP rank 0), point to point
   inside rank 0's data-parallel group: a scatter with per-rank shapes;
4. each leader broadcasts its share down its pipeline group, then each pipeline stage's first TP x CP rank
   broadcasts it inside its TP x CP group.

The result on every rank is bit-identical to ``OPDBatch.from_lists(...).shard(dp_rank, dp_size)`` of the same
rollouts (tests/distributed/test_handover.py checks it at DP=2, TP=2 and PP=2).

Waiting: a rank polls a counter in the default store (``torch.distributed``'s rendezvous store) with a short,
growing sleep and logs a heartbeat every ``heartbeat_s``; no collective is entered until rank 0 has posted, so
``parallel.distributed_timeout_minutes`` bounds only the transfer, never the rollout phase. A rank 0 that dies
makes the store unreachable (or torchrun stops the job), so a waiter does not wait forever on a dead controller.

Why the counter is per rank and lives in the store: hand-over n is ready when rank 0's ``posted`` counter
reaches n; each waiter learns its own n by incrementing its ``taken/<rank>`` counter, so no process-local
state has to agree across ranks, and re-created Megatron layouts on the same process group keep counting.
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

__all__ = ["HandoverGroups", "build_shard", "hand_over", "wait_for_controller"]

logger = logging.getLogger(__name__)

_KEY = "megatron_opd/handover"
_POLL_MIN_S = 0.001  # a rank that arrives just before rank 0 posts should not add a long sleep to the step
_POLL_MAX_S = 0.05


@dataclass(frozen=True)
class HandoverGroups:
    """The process groups one hand-over uses, from this rank's point of view.

    ``dp``: rank 0's data-parallel group (the ranks with TP = PP = CP rank 0, one per data-parallel rank), on
    those ranks only; else None (and None when there is one data-parallel rank). Its group rank 0 is rank 0.
    ``pp``: this rank's pipeline group, on ranks with TP = CP rank 0 when there are several stages; else None.
    Its group rank 0 is the first stage. ``tp_cp``: this rank's tensor x context-parallel group when it has
    several ranks; else None. Its group rank 0 is TP = CP rank 0. ``world``: the group every rank is in.
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


def _shard_shape(lengths: torch.Tensor, rows: range) -> tuple[int, int]:
    """(L, R) of a shard padded to its own real length, exactly as ``OPDBatch.select`` trims it."""
    if not len(rows):
        return 1, 1
    P, R = lengths[rows.start : rows.stop, 0], lengths[rows.start : rows.stop, 1]
    return max(int((P + R).max()), 1), max(int(R.max()), 1)


def _topk_width(rollouts_topk: Sequence, responses: Sequence[Sequence[int]]) -> int:
    """K as ``OPDBatch.from_lists`` reads it: from the first sequence with a response, else 1."""
    for x, r in zip(rollouts_topk, responses):
        if len(r):
            return int(torch.as_tensor(x[0]).numel()) if len(x) else 1
    return 1


def build_shard(
    rollouts: RolloutResult,
    scores: TeacherScores,
    window: HorizonWindow,
    rows: range,
    pad_id: int = 0,
) -> OPDBatch:
    """Sequences ``rows`` of scored rollouts as one padded ``OPDBatch`` (rank 0 calls it once per data-parallel
    share). Equal to ``OPDBatch.from_lists(...)`` of all rollouts followed by ``select(rows)``.

    Shapes: tokens [b, L] int64, lengths [b], teacher_logprobs [b, R] float32, top-K [b, R, K] (module doc).
    Per-sequence inputs may be lists (converted with numpy, no per-token Python loop) or tensors.
    """
    prompts, responses, teacher = rollouts.prompt_ids, rollouts.response_ids, scores.logprobs
    if not len(prompts) == len(responses) == len(teacher):
        raise ValueError("prompts, responses and teacher_logprobs must have one entry per rollout")
    lengths = torch.tensor([[len(prompts[i]), len(responses[i])] for i in rows], dtype=torch.long)
    for i, (_, n) in zip(rows, lengths.tolist()):
        if len(teacher[i]) < n:
            raise ValueError(f"rollout {i}: {len(teacher[i])} teacher logprobs for {n} response tokens")
    L, R = _shard_shape(lengths, range(len(rows)))
    use_topk = scores.topk_ids is not None
    if use_topk != (scores.topk_logprobs is not None):
        raise ValueError("topk_ids and teacher_topk_logprobs go together (both or neither)")
    K = _topk_width(scores.topk_ids, responses) if use_topk else 0
    b = len(rows)
    # empty, then each row's tail padded: the top-K buffers are most of the bytes, and writing them twice
    # (zeros, then values) costs as much as the copy itself
    tokens = torch.empty((b, L), dtype=torch.long)
    teacher_lp = torch.empty((b, R), dtype=torch.float32)
    topk_ids = torch.empty((b, R, K), dtype=torch.long) if use_topk else None
    topk_lp = torch.empty((b, R, K), dtype=torch.float32) if use_topk else None
    for j, (i, (p, n)) in enumerate(zip(rows, lengths.tolist())):
        tokens[j, :p] = _as_vector(prompts[i], p, torch.long)
        tokens[j, p : p + n] = _as_vector(responses[i], n, torch.long)
        tokens[j, p + n :] = pad_id
        teacher_lp[j, :n] = _as_vector(teacher[i], n, torch.float32)
        teacher_lp[j, n:] = 0.0
        if use_topk:
            if n:
                topk_ids[j, :n] = _as_rows(scores.topk_ids[i], n, K, torch.long)
                topk_lp[j, :n] = _as_rows(scores.topk_logprobs[i], n, K, torch.float32)
            topk_ids[j, n:] = 0
            topk_lp[j, n:] = 0.0
    return OPDBatch(
        tokens=tokens,
        prompt_lengths=lengths[:, 0].clone(),
        response_lengths=lengths[:, 1].clone(),
        teacher_logprobs=teacher_lp,
        window=window,
        topk_ids=topk_ids,
        teacher_topk_logprobs=topk_lp,
    )


def wait_for_controller(store: dist.Store, rank: int, *, heartbeat_s: float = 60.0) -> int:
    """Block (outside any collective) until rank 0 has posted this rank's next hand-over; returns its number.

    Polls the store's ``posted`` counter with a sleep growing from 1 ms to 50 ms, logging every
    ``heartbeat_s`` seconds so a long rollout phase shows up in the logs as waiting, not as a hang.
    """
    n = store.add(f"{_KEY}/taken/{rank}", 1)
    t0 = last = time.monotonic()
    sleep = _POLL_MIN_S
    while store.add(f"{_KEY}/posted", 0) < n:
        time.sleep(sleep)
        sleep = min(2 * sleep, _POLL_MAX_S)
        now = time.monotonic()
        if now - last >= heartbeat_s:
            logger.info("rank %d: waiting %.0f s for rank 0's rollouts (hand-over %d)", rank, now - t0, n)
            last = now
    return n


def _post(store: dist.Store) -> None:
    store.add(f"{_KEY}/posted", 1)


def _tensors(batch: OPDBatch) -> list[torch.Tensor]:
    out = [batch.tokens, batch.teacher_logprobs]
    if batch.topk_ids is not None:
        out += [batch.topk_ids, batch.teacher_topk_logprobs]
    return out


def _empty_shard(lengths: torch.Tensor, rows: range, K: int, window: HorizonWindow) -> OPDBatch:
    """Receive buffers shaped like the shard ``rows`` (contents arrive by send or broadcast)."""
    L, R = _shard_shape(lengths, rows)
    b = len(rows)
    mine = lengths[rows.start : rows.stop]
    return OPDBatch(
        tokens=torch.empty((b, L), dtype=torch.long),
        prompt_lengths=mine[:, 0].clone(),
        response_lengths=mine[:, 1].clone(),
        teacher_logprobs=torch.empty((b, R), dtype=torch.float32),
        window=window,
        topk_ids=torch.empty((b, R, K), dtype=torch.long) if K else None,
        teacher_topk_logprobs=torch.empty((b, R, K), dtype=torch.float32) if K else None,
    )


def _broadcast(tensors: list[torch.Tensor], group: dist.ProcessGroup | None, src_group_rank: int = 0) -> None:
    device = _comm_device(group)
    for t in tensors:
        moved = t.to(device)
        dist.broadcast(moved, group=group, group_src=src_group_rank)
        if moved.data_ptr() != t.data_ptr():
            t.copy_(moved)


def hand_over(
    rollouts: RolloutResult | None,
    scores: TeacherScores | None,
    window: HorizonWindow,
    groups: HandoverGroups,
    *,
    pad_id: int = 0,
    extra: dict[str, float] | None = None,
    heartbeat_s: float = 60.0,
) -> tuple[OPDBatch, dict[str, float] | None]:
    """Every rank's data-parallel share of rank 0's scored rollouts, and rank 0's ``extra`` (small scalars).

    Rank 0 passes ``rollouts``, ``scores`` and ``extra``; every other rank passes None and waits on the store
    (module doc). All ranks must call it, with the same ``window`` and ``pad_id``. Returns this rank's
    ``OPDBatch`` (bit-identical to ``OPDBatch.from_lists(...).shard(dp_rank, dp_size)``) and ``extra``.
    """
    world = dist.get_world_size(groups.world) if dist.is_initialized() else 1
    rank = dist.get_rank(groups.world) if dist.is_initialized() else 0
    if rank == 0 and (rollouts is None or scores is None):
        raise ValueError("hand-over: rank 0 must pass the rollouts and the teacher scores")
    if world == 1:
        return build_shard(rollouts, scores, window, range(len(rollouts)), pad_id), extra

    store = dist.distributed_c10d._get_default_store()
    shares: list[OPDBatch] = []
    if rank == 0:
        B = len(rollouts)
        if B % groups.dp_size:
            _post(store)  # let the waiters through so that every rank fails on the header, not on a timeout
        else:
            m = B // groups.dp_size
            shares = [
                build_shard(rollouts, scores, window, range(d * m, (d + 1) * m), pad_id)
                for d in range(groups.dp_size)
            ]
            _post(store)
        lengths = torch.tensor([[len(p), len(r)] for p, r in zip(rollouts.prompt_ids, rollouts.response_ids)])
        K = shares[0].topk_ids.shape[-1] if shares and shares[0].topk_ids is not None else 0
        header = torch.tensor([B, K], dtype=torch.long)
    else:
        wait_for_controller(store, rank, heartbeat_s=heartbeat_s)
        header = torch.empty(2, dtype=torch.long)

    # shapes first: every rank learns every share's padded shape from the lengths
    _broadcast([header], groups.world)
    B, K = header.tolist()
    if rank != 0:
        lengths = torch.empty((B, 2), dtype=torch.long)
    _broadcast([lengths], groups.world)
    box = [extra]
    dist.broadcast_object_list(box, group=groups.world, group_src=0)
    if B % groups.dp_size:
        raise ValueError(f"a batch of {B} sequences does not split over {groups.dp_size} data-parallel ranks")
    m = B // groups.dp_size
    mine = range(groups.dp_rank * m, (groups.dp_rank + 1) * m)

    if rank == 0:
        local = shares[0]
    else:
        local = _empty_shard(lengths, mine, K, window)
    if groups.dp is not None:
        device = _comm_device(groups.dp)
        if rank == 0:
            pending = []
            for d in range(1, groups.dp_size):
                for t in _tensors(shares[d]):
                    pending.append(dist.isend(t.to(device), group=groups.dp, group_dst=d))
            for work in pending:
                work.wait()
        else:
            for t in _tensors(local):
                moved = t.to(device)
                dist.recv(moved, group=groups.dp, group_src=0)
                if moved.data_ptr() != t.data_ptr():
                    t.copy_(moved)
    if groups.pp is not None:
        _broadcast(_tensors(local), groups.pp)
    if groups.tp_cp is not None:
        _broadcast(_tensors(local), groups.tp_cp)
    return local, box[0]
