"""LLM analyses on tiny random models: per-position KL (Fig. 13) and prefix continuation (Fig. 9/10)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_opd.analysis.position_kl import full_reverse_kl, position_kl
from megatron_opd.analysis.prefix import continuation_accuracy, continue_teacher_prefixes
from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.rollout.tiny_model import make_tiny_hf_model
from megatron_opd.teacher.embedded import EmbeddedScorer


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    return make_tiny_hf_model(str(root / "student"), seed=0), make_tiny_hf_model(
        str(root / "teacher"), seed=1
    )


PROMPTS = [[5, 6, 7], [8, 9]]


def test_full_reverse_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    want = torch.nn.functional.kl_div(
        t.log_softmax(-1), s.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(full_reverse_kl(s, t), want, atol=1e-6, rtol=1e-5)
    assert full_reverse_kl(s, s).abs().max() < 1e-6


def test_position_kl_matches_transformers_and_is_zero_for_self(dirs):
    student_dir, teacher_dir = dirs
    engine = EmbeddedEngine.from_hf_dir(student_dir)
    s_scorer, t_scorer = EmbeddedScorer.from_hf_dir(student_dir), EmbeddedScorer.from_hf_dir(teacher_dir)
    T = 8
    pk = position_kl(engine, s_scorer, t_scorer, PROMPTS, n=2, max_new_tokens=T, seed=3)
    assert pk.counts[0] == 4 and pk.counts.max() <= 4
    self_kl = position_kl(engine, s_scorer, s_scorer, PROMPTS, n=2, max_new_tokens=T, seed=3)
    assert max(abs(x) for x in self_kl.means() if not math.isnan(x)) < 1e-5  # KL(p || p) = 0 up to fp32

    # Independent check: the same responses through transformers, KL by torch.
    ro = engine.generate(PROMPTS, n=2, max_new_tokens=T, temperature=1.0, top_p=1.0, seed=3)
    hs = AutoModelForCausalLM.from_pretrained(student_dir, torch_dtype=torch.float32)
    ht = AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32)
    sums = torch.zeros(T, dtype=torch.float64)
    with torch.no_grad():
        for p, r in zip(ro.prompt_ids, ro.response_ids):
            ids = torch.tensor([p + r.tolist()])
            sl = hs(ids).logits[0, len(p) - 1 : len(p) + len(r) - 1]
            tl = ht(ids).logits[0, len(p) - 1 : len(p) + len(r) - 1]
            kl = torch.nn.functional.kl_div(
                tl.log_softmax(-1), sl.log_softmax(-1), log_target=True, reduction="none"
            )
            sums[: len(r)] += kl.sum(-1).double()
    # fp32 forward passes by two implementations: agreement to ~1e-4 relative on KLs of order 1.
    torch.testing.assert_close(pk.sums, sums, atol=1e-4, rtol=1e-4)
    assert pk.sums.sum() > 0.1  # two random models really disagree
    assert len(pk.bucket_means(4)) == 4


def test_prefix_continuation_keeps_teacher_prefix(dirs):
    student_dir, teacher_dir = dirs
    student, teacher = EmbeddedEngine.from_hf_dir(student_dir), EmbeddedEngine.from_hf_dir(teacher_dir)
    T = 10
    c = continue_teacher_prefixes(teacher, student, PROMPTS, ratio=0.3, max_new_tokens=T, n=3, seed=1)
    assert c.prefix_tokens == 3 and len(c.response_ids) == 6
    for pre, full in zip(c.prefix_ids, c.response_ids):
        assert full[: len(pre)] == pre and len(full) <= T
    # ratio 1: the teacher writes everything; the score is then the teacher's own.
    first_token_is_even = lambda i, r: len(r) > 0 and r[0] % 2 == 0  # noqa: E731
    acc = continuation_accuracy(
        teacher, student, PROMPTS, first_token_is_even, ratios=[0.0, 1.0], max_new_tokens=T, n=4, seed=2
    )
    ro = teacher.generate(PROMPTS, n=4, max_new_tokens=T, temperature=1.0, top_p=1.0, seed=2)
    assert acc[1.0] == sum(first_token_is_even(0, r) for r in ro.response_ids) / 8
    assert 0.0 <= acc[0.0] <= 1.0
