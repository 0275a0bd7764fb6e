"""hand_over_local on two data-parallel gloo ranks (no TP/PP): each replica keeps its own micro-batches, the
statistics cover both, a slow replica is waited for on the store, and one replica's failure stops both."""

import time

import pytest
import torch

from megatron_opd.utils.spawn import run_on_ranks


def _rollouts(lengths, seed):
    from megatron_opd.rollout.types import RolloutResult

    g = torch.Generator().manual_seed(seed)
    return RolloutResult(
        prompt_index=list(range(len(lengths))),
        prompt_ids=[[5, 6, 7]] * len(lengths),
        response_ids=[torch.randint(0, 50, (n,), generator=g) for n in lengths],
        logprobs=[torch.zeros(n) for n in lengths],
        finish_reasons=["length" if n == 6 else "stop" for n in lengths],
    )


def _worker(rank, world, mode):
    from megatron_opd.algorithms.horizon import HorizonWindow
    from megatron_opd.teacher.scorer import TeacherScores
    from megatron_opd.training.handover import HandoverGroups, build_micro_batches
    from megatron_opd.training.local_rollouts import hand_over_local

    window = HorizonWindow(0, 6, 6)
    lengths = [[2, 6, 4, 1], [6, 6, 3, 5]][rank]
    rollouts = _rollouts(lengths, seed=rank)
    scores = TeacherScores(logprobs=[-torch.rand(n) for n in lengths])
    if mode == "broken" and rank == 1:
        scores = TeacherScores(logprobs=[-torch.rand(1) for _ in lengths])  # too few teacher logprobs
    if mode == "slow" and rank == 1:
        time.sleep(3.0)  # rank 0 waits on the store, not inside a collective
    groups = HandoverGroups(dp_rank=rank, dp_size=world, dp=None, pp=None, tp_cp=None)
    batches, stats = hand_over_local(rollouts, scores, window, groups, micro_batch_size=2, leader=True)
    own = build_micro_batches(rollouts, scores, window, range(len(lengths)), 2)
    same = all(
        torch.equal(a.tokens, b.tokens) and torch.equal(a.teacher_logprobs, b.teacher_logprobs)
        for a, b in zip(batches, own, strict=True)
    )
    return {"same": same, "stats": stats, "n": len(batches)}


@pytest.mark.parametrize("mode", ["plain", "slow"])
def test_each_replica_keeps_its_share_and_the_statistics_cover_both(mode):
    results = run_on_ranks(_worker, 2, mode)
    for r in results:
        assert r["same"] and r["n"] == 2
        assert r["stats"] == results[0]["stats"]
    stats = results[0]["stats"]
    assert stats["rollout/generated_tokens"] == 33.0  # 13 + 20, both replicas
    assert stats["rollout/response_length_max"] == 6.0
    assert stats["rollout/truncation_rate"] == pytest.approx(3 / 8)


def test_one_replicas_failure_stops_every_rank():
    with pytest.raises(RuntimeError) as e:
        run_on_ranks(_worker, 2, "broken")
    text = str(e.value)
    assert "rank 0 failed" in text and "data-parallel replica 1 could not build its batch" in text
    assert "rank 1 failed" in text and "teacher logprobs" in text
