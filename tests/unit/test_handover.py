"""training/handover.py in one process: building micro-batches straight from the engines' output, the errors,
and the store wait (the multi-rank paths are in tests/distributed/test_handover_ranks.py)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
import torch.distributed as dist

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.rollout.types import RolloutResult
from megatron_opd.teacher.scorer import TeacherScores
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.handover import HandoverGroups, build_micro_batches, hand_over, wait_for_controller

WINDOW = HorizonWindow(0, 6, 8)
FIELDS = (
    "tokens",
    "prompt_lengths",
    "response_lengths",
    "teacher_logprobs",
    "topk_ids",
    "teacher_topk_logprobs",
)


def _scored(topk: bool, as_tensors: bool) -> tuple[RolloutResult, TeacherScores]:
    g = torch.Generator().manual_seed(1)
    P, R = [3, 1, 5, 2], [4, 0, 7, 1]
    prompts = [torch.randint(1, 90, (p,), generator=g).tolist() for p in P]
    responses = [torch.randint(1, 90, (r,), generator=g).tolist() for r in R]
    # float64 inputs, as JSON and .tolist() give them: the fp32 rounding must match from_lists'
    teacher = [(-torch.rand(r + 1, generator=g, dtype=torch.float64)).tolist() for r in R]
    ids = [torch.randint(0, 90, (r, 2), generator=g) for r in R]
    lps = [-torch.rand(r, 2, generator=g, dtype=torch.float64) for r in R]
    if not as_tensors:
        ids, lps = [x.tolist() for x in ids], [x.tolist() for x in lps]
    rollouts = RolloutResult(list(range(4)), prompts, responses, [[0.0] * r for r in R], ["stop"] * 4)
    return rollouts, TeacherScores(teacher, ids if topk else None, lps if topk else None)


def _old(rollouts: RolloutResult, scores: TeacherScores, pad_id: int = 0) -> OPDBatch:
    return OPDBatch.from_lists(
        rollouts.prompt_ids,
        rollouts.response_ids,
        scores.logprobs,
        WINDOW,
        topk_ids=scores.topk_ids,
        teacher_topk_logprobs=scores.topk_logprobs,
        pad_id=pad_id,
    )


def _assert_same(a: OPDBatch, b: OPDBatch) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f
    assert a.window == b.window


@pytest.mark.parametrize("topk", [False, True])
@pytest.mark.parametrize("as_tensors", [False, True])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_equal_from_lists_split(topk: bool, as_tensors: bool, micro: int) -> None:
    rollouts, scores = _scored(topk, as_tensors)
    old = _old(rollouts, scores, pad_id=7)
    new = build_micro_batches(rollouts, scores, WINDOW, range(4), micro, pad_id=7)
    expect = old.split(4 // micro)
    assert len(new) == len(expect)
    for a, b in zip(new, expect):
        _assert_same(a, b)


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_without_teacher_scores_the_batches_carry_none(micro: int) -> None:
    """teacher.backend 'megatron': the step scores, so nothing of the teacher is handed over."""
    rollouts, _ = _scored(False, False)
    old = OPDBatch.from_lists(rollouts.prompt_ids, rollouts.response_ids, None, WINDOW, pad_id=7)
    new = build_micro_batches(rollouts, None, WINDOW, range(4), micro, pad_id=7)
    expect = old.split(4 // micro)
    assert len(new) == len(expect)
    for a, b in zip(new, expect):
        assert a.teacher_logprobs is None and a.topk_ids is None
        _assert_same(a, b)
    batches, _ = hand_over(
        rollouts, None, WINDOW, HandoverGroups(0, 1, None, None, None), micro_batch_size=4, pad_id=7
    )
    _assert_same(batches[0], old)


def test_a_share_equals_select_of_the_whole_batch() -> None:
    rollouts, scores = _scored(True, False)
    new = build_micro_batches(rollouts, scores, WINDOW, range(2, 4), 2)
    _assert_same(new[0], _old(rollouts, scores).shard(1, 2))


def test_one_process_hand_over_needs_no_process_group() -> None:
    rollouts, scores = _scored(True, False)
    batches, extra = hand_over(
        rollouts, scores, WINDOW, HandoverGroups(0, 1, None, None, None), micro_batch_size=4, extra={"a": 1.0}
    )
    assert extra == {"a": 1.0}
    _assert_same(batches[0], _old(rollouts, scores))


def test_bad_input_names_what_is_wrong() -> None:
    rollouts, scores = _scored(True, False)
    short = TeacherScores([lp[:2] for lp in scores.logprobs], scores.topk_ids, scores.topk_logprobs)
    with pytest.raises(ValueError, match="rollout 0: 2 teacher logprobs for 4 response tokens"):
        build_micro_batches(rollouts, short, WINDOW, range(4), 1)
    with pytest.raises(ValueError, match="both or neither"):
        build_micro_batches(
            rollouts, TeacherScores(scores.logprobs, scores.topk_ids, None), WINDOW, range(4), 1
        )
    with pytest.raises(ValueError, match="cannot split a batch of 4 sequences into 0 equal micro-batches"):
        build_micro_batches(rollouts, scores, WINDOW, range(4), 8)
    with pytest.raises(ValueError, match="rank 0 must pass"):
        hand_over(None, None, WINDOW, HandoverGroups(0, 1, None, None, None), micro_batch_size=1)


def test_waiter_returns_once_rank_0_posts_and_logs_heartbeats(caplog) -> None:
    store = dist.HashStore()
    posted = threading.Timer(1.0, lambda: store.add("megatron_opd/handover/posted", 1))
    posted.start()
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="megatron_opd.training.handover"):
        n = wait_for_controller(store, rank=1, heartbeat_s=0.2)
    waited = time.monotonic() - t0
    assert n == 1
    assert waited >= 0.9  # it did wait for the post, not return at once
    assert sum("waiting" in r.getMessage() for r in caplog.records) >= 1
    # the next hand-over waits for the next post, not the one already seen
    second = threading.Timer(0.3, lambda: store.add("megatron_opd/handover/posted", 1))
    second.start()
    t0 = time.monotonic()
    assert wait_for_controller(store, rank=1, heartbeat_s=60) == 2
    assert time.monotonic() - t0 >= 0.2


def test_a_short_wait_ends_within_a_millisecond_of_the_post(monkeypatch) -> None:
    """Replicas reach the hand-over a few ms apart: the waiter polls every 1 ms for its first 0.25 s, so it sees a
    post at 40 ms by 42 ms (a sleep doubling from 1 ms would next look at 63 ms), and only then backs off (a post at
    2 s is seen within the 50 ms cap). A fake clock makes this exact."""
    from megatron_opd.training import handover

    clock = {"t": 0.0}
    monkeypatch.setattr(handover.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(handover.time, "sleep", lambda s: clock.__setitem__("t", clock["t"] + s))

    class Store:
        def __init__(self, post_at: float) -> None:
            self.post_at = post_at

        def add(self, key: str, n: int) -> int:
            return int(clock["t"] >= self.post_at)

    for post_at, latest in ((0.040, 0.042), (2.0, 2.05)):
        clock["t"] = 0.0
        handover.wait_for_count(Store(post_at), "k", 1, heartbeat_s=60, what="test")
        assert post_at <= clock["t"] <= latest, (post_at, clock["t"])
