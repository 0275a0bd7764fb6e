"""The prompt sampler: epoch coverage, determinism, exact resume, data-parallel shards."""

import pytest

from megatron_opd.data import PromptSampler, shard


def take(sampler, k):
    return [sampler.next_batch() for _ in range(k)]


def test_each_epoch_is_a_permutation_without_repeats():
    s = PromptSampler(23, 5, seed=3, epochs=2)
    assert s.steps_per_epoch == 4 and s.total_steps == 8
    batches = list(s)
    assert len(batches) == 8 and all(len(b.indices) == 5 for b in batches)
    for epoch in (0, 1):
        seen = [i for b in batches if b.epoch == epoch for i in b.indices]
        assert len(seen) == len(set(seen)) == 20  # 23 mod 5 = 3 left out of this epoch
        assert set(seen) <= set(range(23))
    assert [b.step for b in batches] == list(range(8))
    e0 = [i for b in batches[:4] for i in b.indices]
    e1 = [i for b in batches[4:] for i in b.indices]
    assert e0 != e1  # a fresh order each epoch
    with pytest.raises(StopIteration):
        s.next_batch()


def test_same_seed_same_order_other_seed_other_order():
    a = [b.indices for b in PromptSampler(50, 8, seed=1, epochs=1)]
    b = [b.indices for b in PromptSampler(50, 8, seed=1, epochs=1)]
    c = [b.indices for b in PromptSampler(50, 8, seed=2, epochs=1)]
    assert a == b and a != c


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 6])
def test_resume_from_state_dict_is_exact(stop_after):
    ref = [b for b in PromptSampler(17, 4, seed=9, epochs=2)]
    first = PromptSampler(17, 4, seed=9, epochs=2)
    done = take(first, stop_after)
    state = first.state_dict()
    assert state["consumed_prompts"] == 4 * stop_after
    resumed = PromptSampler(17, 4, seed=0, epochs=2)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert done + list(resumed) == ref


def test_resume_refuses_a_different_dataset():
    s = PromptSampler(17, 4, seed=9)
    with pytest.raises(ValueError, match="num_examples=17"):
        PromptSampler(18, 4, seed=9).load_state_dict(s.state_dict())


def test_shards_partition_the_batch_over_ranks():
    b = PromptSampler(40, 8, seed=0).next_batch()
    parts = [b.local_indices(r, 4) for r in range(4)]
    assert [i for p in parts for i in p] == b.indices and all(len(p) == 2 for p in parts)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        shard(list(range(6)), 0, 4)


def test_too_small_dataset_is_refused():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PromptSampler(3, 4, seed=0)


def test_unshuffled_order_is_the_file_order():
    assert [b.indices for b in PromptSampler(6, 3, seed=0, epochs=1, shuffle=False)] == [[0, 1, 2], [3, 4, 5]]
