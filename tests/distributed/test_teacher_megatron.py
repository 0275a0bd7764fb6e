"""The Megatron teacher (``teacher.backend: megatron``) scores like the embedded teacher, at TP=1 and TP=2 x PP=2.

``MegatronTeacher.score`` (collective) on the tiny pair's teacher, built from its HF directory with the student's
builders, against ``EmbeddedScorer`` (the in-process decoder) on the same prompts and responses: log p of every
response token, the teacher's own top-K (strategy 'teacher': ids and logprobs) and the teacher's logprobs at
given student ids (strategy 'student'). Every rank returns the same scores.

Tolerance: fp32 on both sides, atol 1e-4 on logprobs of magnitude <= ~10. Two implementations of the same
network (Megatron's layers and the embedded decoder) order their sums differently (attention, RMSNorm, the
vocab-parallel softmax at TP=2); the embedded scorer's own parity test with HF uses the same bound. Top-K ids
must match exactly (the tiny model's logits are far apart: no near-ties at this scale).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.distributed
K = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from megatron_opd.rollout.tiny_model import make_tiny_pair

    return Path(make_tiny_pair(str(tmp_path_factory.mktemp("pair"))))


def _requests():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 128, (int(n),), generator=g).tolist() for n in (3, 1, 6, 4, 2)]
    resps = [torch.randint(0, 128, (int(n),), generator=g).tolist() for n in (5, 9, 1, 7, 4)]
    student_ids = [torch.randint(0, 128, (len(r), K), generator=g).tolist() for r in resps]
    return prompts, resps, student_ids


def _worker(rank, world, d, tp, pp):
    from megatron_opd.config.tree import ParallelConfig, TeacherConfig
    from megatron_opd.model.builders import model_config_from_hf
    from megatron_opd.parallel.state import initialize_parallel
    from megatron_opd.teacher.megatron import MegatronTeacher

    initialize_parallel(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=0
    )
    teacher = MegatronTeacher.build(
        TeacherConfig(hf_path=str(d / "teacher"), backend="megatron"),
        model_config_from_hf(str(d / "student")),
        vocab_size=128,
    )
    prompts, resps, sid = _requests()
    out = {"plain": teacher.score(prompts, resps, micro_batch_size=2)}
    out["teacher"] = teacher.score(prompts, resps, topk=K, strategy="teacher", micro_batch_size=3)
    out["student"] = teacher.score(prompts, resps, topk=K, strategy="student", student_topk_ids=sid)
    return {k: (v.logprobs, v.topk_ids, v.topk_logprobs) for k, v in out.items()}


@pytest.fixture(scope="module")
def embedded(tiny_pair):
    from megatron_opd.teacher.embedded import EmbeddedScorer

    scorer = EmbeddedScorer.from_hf_dir(str(tiny_pair / "teacher"))
    prompts, resps, sid = _requests()
    out = {
        "plain": scorer.score(prompts, resps),
        "teacher": scorer.score(prompts, resps, topk=K, strategy="teacher"),
        "student": scorer.score(prompts, resps, topk=K, strategy="student", student_topk_ids=sid),
    }
    return {k: (v.logprobs, v.topk_ids, v.topk_logprobs) for k, v in out.items()}


def _flat(x):
    """Per-sample scores ([T] or [T, K] tensors) as one flat float64 tensor."""
    return torch.cat([torch.as_tensor(row, dtype=torch.float64).reshape(-1) for row in x])


def _compare(got, want):
    for case in ("plain", "teacher", "student"):
        lp, ids, tlp = got[case]
        w_lp, w_ids, w_tlp = want[case]
        assert [len(r) for r in lp] == [len(r) for r in w_lp]
        assert all(r.dtype == torch.float32 for r in lp), case  # TeacherScores' documented type
        torch.testing.assert_close(_flat(lp), _flat(w_lp), atol=ATOL, rtol=0, msg=case)
        if case == "plain":
            assert ids is None and tlp is None
            continue
        assert len(ids) == len(w_ids) and all(torch.equal(x, y) for x, y in zip(ids, w_ids)), case
        assert all(x.dtype == torch.long and t.dtype == torch.float32 for x, t in zip(ids, tlp)), case
        torch.testing.assert_close(_flat(tlp), _flat(w_tlp), atol=ATOL, rtol=0, msg=case)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_megatron_teacher_scores_equal_the_embedded_teacher(tiny_pair, embedded, tp, pp):
    results = run_on_ranks(_worker, tp * pp, tiny_pair, tp, pp)
    assert max(abs(v) for row in embedded["plain"][0] for v in row) > 1.0  # scores are not trivially ~0
    for r in results:
        _compare(r, embedded)
