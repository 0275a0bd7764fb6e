"""Tensor hand-over (training/handover.py) on gloo ranks.

- At DP=4, DP=2 x TP=2, DP=2 x PP=2 and TP=2 x PP=2 (4 processes, one launch), with and without top-K, from
  list and from tensor inputs, 1 and 2 sequences per micro-batch: every rank's micro-batches are bit-identical
  (torch.equal, same dtype and shape) to the old path, ``OPDBatch.from_lists(...).shard(dp_rank,
  dp_size).split(...)``, and every rank gets rank 0's rollout statistics. A batch that does not split over the
  data-parallel ranks fails on every rank (rank 0 with the error, the others with its message), none hangs.
- A rank that waits for rank 0 longer than the collective timeout (2 s here) does not fail: a plain collective
  with that timeout does fail in the same situation (the control), the hand-over succeeds and logs heartbeats.
"""

from __future__ import annotations

import pytest

from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP) on 4 ranks: DP = 4, 2, 2, 1
K = 3


def _scored_rollouts(n: int, topk: bool, as_tensors: bool, seed: int = 0):
    """Ragged synthetic rollouts: an empty response, teacher logprobs longer than the response, odd lengths."""
    import torch

    from megatron_opd.rollout.types import RolloutResult
    from megatron_opd.teacher.scorer import TeacherScores

    g = torch.Generator().manual_seed(seed)
    P = torch.randint(1, 7, (n,), generator=g).tolist()
    R = torch.randint(0, 9, (n,), generator=g).tolist()
    R[1] = 0
    prompts = [torch.randint(1, 50, (p,), generator=g).tolist() for p in P]
    responses = [torch.randint(1, 50, (r,), generator=g).tolist() for r in R]
    teacher = [
        (-torch.rand(r + (2 if i == 2 else 0), generator=g, dtype=torch.float64)).tolist()
        for i, r in enumerate(R)
    ]
    ids = [torch.randint(0, 50, (r, K), generator=g) for r in R]
    lps = [-torch.rand(r, K, generator=g, dtype=torch.float64) for r in R]
    if not as_tensors:
        ids, lps = [x.tolist() for x in ids], [x.tolist() for x in lps]
    rollouts = RolloutResult(
        prompt_index=list(range(n)),
        prompt_ids=prompts,
        response_ids=responses,
        logprobs=[[0.0] * r for r in R],
        finish_reasons=["length"] * n,
    )
    scores = TeacherScores(
        logprobs=teacher, topk_ids=ids if topk else None, topk_logprobs=lps if topk else None
    )
    return rollouts, scores


def _same(a, b) -> bool:
    import torch

    fields = [
        "tokens",
        "prompt_lengths",
        "response_lengths",
        "teacher_logprobs",
        "topk_ids",
        "teacher_topk_logprobs",
    ]
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        if (x is None) != (y is None):
            return False
        if x is not None and (x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y)):
            return False
    return a.window == b.window


def _layouts_worker(rank: int, world: int) -> dict:
    import itertools

    import torch.distributed as dist

    from megatron_opd.algorithms.horizon import HorizonWindow
    from megatron_opd.config.tree import ParallelConfig
    from megatron_opd.parallel.state import initialize_parallel
    from megatron_opd.training.batch import OPDBatch
    from megatron_opd.training.handover import HandoverGroups, hand_over

    window = HorizonWindow(1, 6, 8)
    out: dict = {}
    for tp, pp in LAYOUTS:
        info = initialize_parallel(
            ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=0
        )
        groups = HandoverGroups.from_mpu()
        for topk, as_tensors, micro in itertools.product((False, True), (False, True), (1, 2)):
            rollouts, scores = _scored_rollouts(8, topk, as_tensors, seed=tp * 10 + pp)
            shard = OPDBatch.from_lists(
                rollouts.prompt_ids,
                rollouts.response_ids,
                scores.logprobs,
                window,
                topk_ids=scores.topk_ids,
                teacher_topk_logprobs=scores.topk_logprobs,
                pad_id=99,
            ).shard(info.dp_rank, info.dp_size)
            old = shard.split(shard.size // micro)
            stats = {"rollout/x": 1.5 + tp + pp} if rank == 0 else None
            new, got = hand_over(
                rollouts if rank == 0 else None,
                scores if rank == 0 else None,
                window,
                groups,
                micro_batch_size=micro,
                pad_id=99,
                extra=stats,
            )
            out[(tp, pp, topk, as_tensors, micro)] = {
                "same": len(new) == len(old) and all(_same(a, b) for a, b in zip(new, old)),
                "n_micro": len(new),
                "size": sum(b.size for b in new),
                "dp": info.dp_size,
                "stats": got,
                "has_topk": all(b.topk_ids is not None for b in new),
            }
    # a batch of 6 does not split over DP=4: every rank must fail with the same message, none hang
    initialize_parallel(ParallelConfig(), seed=0)
    rollouts, scores = _scored_rollouts(6, False, False)
    try:
        hand_over(
            rollouts if rank == 0 else None,
            scores if rank == 0 else None,
            window,
            HandoverGroups.from_mpu(),
            micro_batch_size=1,
        )
        out["indivisible"] = "no error"
    except (ValueError, RuntimeError) as e:
        out["indivisible"] = str(e)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def layout_results():
    return run_on_ranks(_layouts_worker, 4, timeout_s=600)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("topk", [False, True])
@pytest.mark.parametrize("as_tensors", [False, True])
@pytest.mark.parametrize("micro", [1, 2])
def test_every_rank_gets_the_old_paths_micro_batches(layout_results, tp, pp, topk, as_tensors, micro) -> None:
    for rank, res in enumerate(layout_results):
        r = res[(tp, pp, topk, as_tensors, micro)]
        assert r["dp"] == 4 // (tp * pp)
        assert r["size"] == 8 // r["dp"]
        assert r["n_micro"] == r["size"] // micro
        assert r["has_topk"] == topk
        assert r["same"], f"rank {rank}: micro-batches differ from from_lists + shard + split"
        assert r["stats"] == {"rollout/x": 1.5 + tp + pp}


def test_indivisible_batch_fails_on_every_rank(layout_results) -> None:
    for res in layout_results:
        assert "6 sequences does not split over 4 data-parallel ranks" in res["indivisible"]


TIMEOUT_S = 2.0
LATE_S = 3 * TIMEOUT_S  # rank 0 arrives this late: well past the collective timeout


def _late_controller_worker(rank: int, world: int) -> dict:
    import logging
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from megatron_opd.algorithms.horizon import HorizonWindow
    from megatron_opd.training.batch import OPDBatch
    from megatron_opd.training.handover import HandoverGroups, hand_over

    short = timedelta(seconds=TIMEOUT_S)
    group = dist.new_group(backend="gloo", timeout=short)
    control = dist.new_group(backend="gloo", timeout=short)
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("megatron_opd.training.handover")
    log.addHandler(_Keep())
    log.setLevel(logging.INFO)
    window = HorizonWindow(0, 8, 8)
    rollouts, scores = _scored_rollouts(4, True, False)
    out: dict = {}
    if rank == 0:
        time.sleep(LATE_S)
    else:
        # the control: a plain collective with the same timeout, while rank 0 is still "generating"
        t0 = time.monotonic()
        try:
            dist.broadcast(torch.zeros(1), group=control, group_src=0)
            out["control"] = "no error"
        except Exception as e:  # noqa: BLE001 - gloo reports a timeout as a generic RuntimeError
            out["control"] = type(e).__name__
        out["control_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    groups = HandoverGroups(dp_rank=rank, dp_size=world, dp=group, pp=None, tp_cp=None, world=group)
    new, stats = hand_over(
        rollouts if rank == 0 else None,
        scores if rank == 0 else None,
        window,
        groups,
        micro_batch_size=2,
        extra={"s": 1.0} if rank == 0 else None,
        heartbeat_s=1.0,
    )
    out["wait_s"] = time.monotonic() - t0
    old = OPDBatch.from_lists(
        rollouts.prompt_ids,
        rollouts.response_ids,
        scores.logprobs,
        window,
        topk_ids=scores.topk_ids,
        teacher_topk_logprobs=scores.topk_logprobs,
    ).shard(rank, world)
    out.update(
        same=len(new) == 1 and _same(new[0], old),
        stats=stats,
        heartbeats=sum("waiting" in m for m in records),
    )
    dist.barrier(group=group)
    return out


def test_waiting_rank_outlives_the_collective_timeout() -> None:
    r0, r1 = run_on_ranks(_late_controller_worker, 2, timeout_s=300)
    assert r1["control"] != "no error", "the control collective should have timed out"
    assert r1["control_s"] < LATE_S
    assert r1["wait_s"] > TIMEOUT_S  # it really waited past the collective timeout in the hand-over
    assert r0["same"] and r1["same"]
    assert r0["stats"] == r1["stats"] == {"s": 1.0}
    assert r1["heartbeats"] >= 1
