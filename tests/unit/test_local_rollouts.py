"""The pieces of training/local_rollouts.py that need no process group: the shares, the seeds and the merged
statistics (the multi-process behaviour is tests/e2e/test_train_loop_local_engines.py)."""

import pytest
import torch

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.rollout.types import RolloutResult
from megatron_opd.training.local_rollouts import (
    local_share,
    merge_rollout_stats,
    raw_rollout_stats,
    replica_seed,
)


def _rollouts(lengths, reasons):
    return RolloutResult(
        prompt_index=list(range(len(lengths))),
        prompt_ids=[[1, 2]] * len(lengths),
        response_ids=[torch.arange(n) for n in lengths],
        logprobs=[torch.zeros(n) for n in lengths],
        finish_reasons=reasons,
    )


def test_shares_are_contiguous_and_cover_the_batch_once():
    shares = [local_share(16, d, 4) for d in range(4)]
    assert [list(s) for s in shares] == [list(range(4 * d, 4 * d + 4)) for d in range(4)]
    with pytest.raises(ValueError, match="do not split"):
        local_share(6, 0, 4)


def test_replica_zero_keeps_the_controller_seed_and_the_others_differ():
    assert replica_seed(12345, 0) == 12345
    seeds = {replica_seed(12345, d) for d in range(8)}
    assert len(seeds) == 8


def test_statistics_merged_over_replicas_equal_those_of_the_whole_batch():
    window = HorizonWindow(0, 8, 8)
    lengths, reasons = [3, 8, 5, 8, 1, 7], ["stop", "length", "stop", "length", "stop", "stop"]
    whole = merge_rollout_stats([raw_rollout_stats(_rollouts(lengths, reasons))], window)
    halves = [raw_rollout_stats(_rollouts(lengths[i : i + 3], reasons[i : i + 3])) for i in (0, 3)]
    assert merge_rollout_stats(halves, window) == whole
    assert whole["rollout/response_length_mean"] == pytest.approx(32 / 6)
    assert whole["rollout/response_length_max"] == 8.0
    assert whole["rollout/truncation_rate"] == pytest.approx(2 / 6)
    assert whole["rollout/generated_tokens"] == 32.0
