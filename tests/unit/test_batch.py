"""OPDBatch: padding to the real length, the window mask, micro-batch splits and the logits/target positions."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.training.batch import OPDBatch

PROMPTS = [[5, 6], [7], [8, 9, 10]]
RESPONSES = [[11, 12, 13], [14, 15, 16, 17, 18], [19]]
TEACHER = [[-0.1, -0.2, -0.3], [-1.0, -1.1, -1.2, -1.3, -1.4], [-2.0]]


WINDOW = HorizonWindow(0, 4, 5)


def _batch(window=WINDOW, **kw) -> OPDBatch:
    return OPDBatch.from_lists(PROMPTS, RESPONSES, TEACHER, window, pad_id=0, **kw)


def test_from_lists_pads_to_real_length() -> None:
    b = _batch()
    assert b.tokens.shape == (3, 6)  # longest prompt + response is 1 + 5, not T_max
    assert b.tokens[0].tolist() == [5, 6, 11, 12, 13, 0]
    assert b.tokens[1].tolist() == [7, 14, 15, 16, 17, 18]
    assert b.prompt_lengths.tolist() == [2, 1, 3] and b.response_lengths.tolist() == [3, 5, 1]
    assert b.teacher_logprobs.shape == (3, 5)
    assert b.teacher_logprobs[1].tolist() == pytest.approx([-1.0, -1.1, -1.2, -1.3, -1.4])


def test_response_mask_is_real_tokens_inside_window() -> None:
    m = _batch(HorizonWindow(1, 4, 5)).response_mask()
    assert m.tolist() == [
        [False, True, True, False, False],
        [False, True, True, True, False],
        [False, False, False, False, False],
    ]
    assert _batch(HorizonWindow(1, 4, 5)).num_distilled_tokens() == 5
    assert _batch(HorizonWindow(1, 4, 5)).num_distilled_sequences() == 2


def test_response_positions_point_at_predicting_logits() -> None:
    b = _batch()
    logit_pos, targets = b.response_positions()
    m = torch.arange(5).unsqueeze(0) < b.response_lengths.unsqueeze(1)
    for i in range(3):
        for j in range(int(b.response_lengths[i])):
            assert int(logit_pos[i, j]) == len(PROMPTS[i]) - 1 + j
            assert int(targets[i, j]) == RESPONSES[i][j]
    assert int(m.sum()) == 9


def test_split_and_shard_retrim_each_piece() -> None:
    b = _batch()
    pieces = b.split(3)
    assert [p.tokens.shape for p in pieces] == [(1, 5), (1, 6), (1, 4)]
    assert pieces[2].teacher_logprobs.shape == (1, 1)
    assert sum(p.num_distilled_tokens() for p in pieces) == b.num_distilled_tokens()
    assert b.shard(1, 3).tokens[0].tolist() == [7, 14, 15, 16, 17, 18]
    with pytest.raises(ValueError, match="equal micro-batches"):
        b.split(2)


def test_trimmed_to_window_drops_tokens_after_the_end() -> None:
    b = _batch(HorizonWindow(0, 2, 5)).trimmed_to_window()
    assert b.tokens.shape == (3, 4) and b.response_lengths.tolist() == [2, 2, 1]
    assert b.tokens[1, :3].tolist() == [7, 14, 15]  # what follows is never read: attention is causal
    assert b.num_distilled_tokens() == 5


def test_topk_inputs_are_padded_per_sequence() -> None:
    K = 2
    ids = [torch.arange(len(r) * K).reshape(len(r), K) for r in RESPONSES]
    lps = [-torch.ones(len(r), K) for r in RESPONSES]
    b = _batch(topk_ids=ids, teacher_topk_logprobs=lps)
    assert b.topk_ids.shape == (3, 5, K) and b.teacher_topk_logprobs.shape == (3, 5, K)
    assert b.topk_ids[0, 2].tolist() == [4, 5] and b.topk_ids[0, 3].tolist() == [0, 0]
    with pytest.raises(ValueError, match="both or neither"):
        _batch(topk_ids=ids)


def test_validation() -> None:
    with pytest.raises(ValueError, match="teacher logprobs"):
        OPDBatch.from_lists([[1]], [[2, 3]], [[-1.0]], HorizonWindow(0, 2, 2))
    with pytest.raises(ValueError, match="at least one token"):
        OPDBatch.from_lists([[]], [[2]], [[-1.0]], HorizonWindow(0, 1, 1))


def test_a_batch_without_teacher_scores_has_the_same_layout():
    """teacher.backend 'megatron': the step scores, so the batch carries no teacher logprobs; masks, positions,
    splits and trims are those of the same batch with scores."""
    prompts, resps = [[5, 6], [7], [8, 9, 10]], [[1, 2, 3], [4], [11, 12]]
    window = HorizonWindow(0, 2, 3)
    scored = OPDBatch.from_lists(prompts, resps, [[0.0] * len(r) for r in resps], window)
    bare = OPDBatch.from_lists(prompts, resps, None, window)
    assert bare.teacher_logprobs is None and bare.response_width == scored.response_width == 3
    assert torch.equal(bare.response_mask(), scored.response_mask())
    for a, b in zip(bare.response_positions(), scored.response_positions()):
        assert torch.equal(a, b)
    for part_a, part_b in zip(bare.select([2, 1]).split(2), scored.select([2, 1]).split(2)):
        assert part_a.teacher_logprobs is None
        assert part_a.response_width == part_b.response_width
        assert torch.equal(part_a.response_mask(), part_b.response_mask())
    trimmed = bare.trimmed_to_window()
    assert trimmed.response_width == 2 and trimmed.num_distilled_tokens() == scored.num_distilled_tokens()
