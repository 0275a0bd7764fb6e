"""The embedded engine and embedded teacher against `transformers` on the same tiny weights (fp32).

Tolerance: 1e-3 max abs logprob difference (the issue's bar). Both sides are fp32 with different reduction orders
(SDPA vs HF eager attention, fused vs unfused log-softmax); measured differences are ~1e-5.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.rollout.tiny_model import EOS_ID, make_tiny_hf_model
from megatron_opd.teacher.embedded import EmbeddedScorer

ATOL = 1e-3
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3]]


@pytest.fixture(scope="module", params=["qwen2_untied", "llama_tied"])
def model_dir(request, tmp_path_factory):
    arch, tie = request.param.split("_")
    path = str(tmp_path_factory.mktemp(request.param))
    return make_tiny_hf_model(path, arch=arch, tie_word_embeddings=tie == "tied", seed=3)


def _hf_response_logits(hf, prompt: list[int], response: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.cat([torch.tensor(prompt), response])[None]).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Per-sample tensors equal exactly (same count, shapes, dtypes and values)."""
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def test_generate_returns_per_sequence_cpu_tensors(model_dir):
    """The documented types of ``RolloutResult`` and ``TeacherScores``: int64 [T] / float32 [T] / int64 [T, K]
    (and float32 [T, K] for the teacher's top-K logprobs), each owning its storage (not a view of a batch
    buffer, which would be kept alive and pickled whole)."""
    eng = EmbeddedEngine.from_hf_dir(model_dir)
    res = eng.generate(PROMPTS, n=2, max_new_tokens=9, temperature=1.0, top_p=1.0, seed=1, topk=3)
    res.validate()
    sc = EmbeddedScorer.from_hf_dir(model_dir, max_tokens_per_batch=30)
    t = sc.score(res.prompt_ids, res.response_ids, topk=3, strategy="teacher")
    t.validate(res.response_ids, topk=3)
    for i, r in enumerate(res.response_ids):
        T = len(r)
        assert isinstance(res.prompt_ids[i], list)
        for x, dtype, shape in (
            (r, torch.long, (T,)),
            (res.logprobs[i], torch.float32, (T,)),
            (res.topk_ids[i], torch.long, (T, 3)),
            (t.logprobs[i], torch.float32, (T,)),
            (t.topk_ids[i], torch.long, (T, 3)),
            (t.topk_logprobs[i], torch.float32, (T, 3)),
        ):
            assert x.dtype == dtype and tuple(x.shape) == shape and x.device.type == "cpu"
            assert x.untyped_storage().nbytes() == x.numel() * x.element_size()


def test_generate_logprobs_match_transformers(model_dir):
    torch.manual_seed(0)
    eng = EmbeddedEngine.from_hf_dir(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    res = eng.generate(PROMPTS, n=2, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=7, topk=4)
    res.validate()
    assert res.prompt_index == [0, 0, 1, 1, 2, 2]
    assert sum(len(r) for r in res.response_ids) > 20
    for i in range(len(res)):
        lg = _hf_response_logits(hf, res.prompt_ids[i], res.response_ids[i])
        ref = torch.log_softmax(lg, -1).gather(-1, res.response_ids[i][:, None]).squeeze(-1)
        assert torch.allclose(res.logprobs[i], ref, atol=ATOL, rtol=0)
        # Student top-K per position = HF's top-4 (ties are measure-zero with random fp32 weights).
        assert torch.equal(res.topk_ids[i], lg.topk(4, -1).indices)


def test_teacher_scores_match_transformers(model_dir):
    eng = EmbeddedEngine.from_hf_dir(model_dir)
    sc = EmbeddedScorer.from_hf_dir(
        model_dir, max_tokens_per_batch=30, logits_block=3
    )  # several chunks, blocks
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    res = eng.generate(PROMPTS, n=2, max_new_tokens=10, temperature=1.0, top_p=1.0, seed=3, topk=3)
    t = sc.score(res.prompt_ids, res.response_ids, topk=3, strategy="teacher")
    s = sc.score(res.prompt_ids, res.response_ids, topk=3, strategy="student", student_topk_ids=res.topk_ids)
    for i in range(len(res)):
        ref = torch.log_softmax(_hf_response_logits(hf, res.prompt_ids[i], res.response_ids[i]), -1)
        tgt = res.response_ids[i]
        assert torch.allclose(t.logprobs[i], ref.gather(-1, tgt[:, None]).squeeze(-1), atol=ATOL)
        assert torch.equal(t.topk_ids[i], ref.topk(3, -1).indices)
        assert torch.allclose(t.topk_logprobs[i], ref.topk(3, -1).values, atol=ATOL)
        ids = res.topk_ids[i]
        assert torch.equal(s.topk_ids[i], res.topk_ids[i])
        assert torch.allclose(s.topk_logprobs[i], ref.gather(-1, ids), atol=ATOL)
    # Lists in (hand-built requests, tools) score exactly as tensors in.
    as_lists = sc.score(
        res.prompt_ids,
        [r.tolist() for r in res.response_ids],
        topk=3,
        strategy="student",
        student_topk_ids=[x.tolist() for x in res.topk_ids],
    )
    assert _equal(as_lists.logprobs, s.logprobs) and _equal(as_lists.topk_logprobs, s.topk_logprobs)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_tiny_hf_model(str(tmp_path_factory.mktemp("q")), seed=5)


def test_seeded_sampling_is_reproducible(qwen_dir):
    eng = EmbeddedEngine.from_hf_dir(qwen_dir)
    kw = dict(n=3, max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = eng.generate(PROMPTS, seed=11, **kw)
    eng.generate(PROMPTS, seed=99, **kw)  # an unrelated call in between must not matter
    b = eng.generate(PROMPTS, seed=11, **kw)
    c = eng.generate(PROMPTS, seed=12, **kw)
    assert _equal(a.response_ids, b.response_ids) and _equal(a.logprobs, b.logprobs)
    assert not _equal(a.response_ids, c.response_ids)


def test_left_padding_does_not_change_greedy_rollouts(qwen_dir):
    eng = EmbeddedEngine.from_hf_dir(qwen_dir, eos_token_ids=[])
    kw = dict(n=1, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    batch = eng.generate(PROMPTS, **kw)
    for i, p in enumerate(PROMPTS):
        alone = eng.generate([p], **kw)
        assert torch.equal(alone.response_ids[0], batch.response_ids[i])
        assert torch.allclose(alone.logprobs[0], batch.logprobs[i], atol=1e-5)


def test_eos_stops_and_length_cuts(qwen_dir):
    eng = EmbeddedEngine.from_hf_dir(qwen_dir)
    assert eng.eos_token_ids == [EOS_ID]
    res = eng.generate([[4] * 3, [7, 8]], n=4, max_new_tokens=6, temperature=1.5, top_p=1.0, seed=2)
    res.validate()
    for r, f in zip(res.response_ids, res.finish_reasons):
        r = r.tolist()
        if f == "stop":
            assert r[-1] == EOS_ID and EOS_ID not in r[:-1]
        else:
            assert len(r) == 6 and EOS_ID not in r
    never = EmbeddedEngine.from_hf_dir(qwen_dir, eos_token_ids=[])
    res = never.generate([[4, 5]], n=2, max_new_tokens=5, temperature=1.0, top_p=1.0, seed=2)
    assert res.finish_reasons == ["length", "length"] and all(len(r) == 5 for r in res.response_ids)
    # A forced stop: with EOS = whatever greedy emits first, every greedy row ends at one token with "stop".
    first = (
        never.generate([[4, 5]], n=1, max_new_tokens=1, temperature=0.0, top_p=1.0, seed=0)
        .response_ids[0][0]
        .item()
    )
    forced = EmbeddedEngine.from_hf_dir(qwen_dir, eos_token_ids=[first])
    res = forced.generate([[4, 5]], n=2, max_new_tokens=5, temperature=0.0, top_p=1.0, seed=0)
    assert res.finish_reasons == ["stop", "stop"] and [r.tolist() for r in res.response_ids] == [[first]] * 2


def test_rows_dropped_after_eos_keep_exact_logprobs(qwen_dir):
    # Ten of 128 tokens stop a row, so rows finish at many different steps and the batch is compacted
    # several times; every row must still carry exactly its own tokens and logprobs.
    stops = list(range(2, 12))
    eng = EmbeddedEngine.from_hf_dir(qwen_dir, eos_token_ids=stops)
    res = eng.generate(PROMPTS, n=8, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3, topk=2)
    res.validate()
    lengths = {len(r) for r, f in zip(res.response_ids, res.finish_reasons) if f == "stop"}
    assert len(lengths) >= 3 and "length" in res.finish_reasons
    for r, f in zip(res.response_ids, res.finish_reasons):
        r = r.tolist()
        assert (f == "stop") == (r[-1] in stops) and not set(r[:-1]) & set(stops)
    ref = EmbeddedScorer.from_hf_dir(qwen_dir).score(
        res.prompt_ids, res.response_ids, topk=2, strategy="teacher"
    )
    for i in range(len(res)):
        assert torch.allclose(res.logprobs[i], ref.logprobs[i], atol=1e-5)
        assert torch.equal(res.topk_ids[i], ref.topk_ids[i])


def test_logprobs_are_temperature_one(qwen_dir):
    eng = EmbeddedEngine.from_hf_dir(qwen_dir)
    res = eng.generate(PROMPTS, n=2, max_new_tokens=8, temperature=0.6, top_p=0.9, seed=0)
    ref = EmbeddedScorer.from_hf_dir(qwen_dir).score(res.prompt_ids, res.response_ids)
    for got, want in zip(res.logprobs, ref.logprobs):
        assert torch.allclose(got, want, atol=1e-5)


def test_tiny_top_p_is_greedy(qwen_dir):
    eng = EmbeddedEngine.from_hf_dir(qwen_dir, eos_token_ids=[])
    greedy = eng.generate(PROMPTS, n=1, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    nucleus = eng.generate(PROMPTS, n=1, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=4)
    assert _equal(greedy.response_ids, nucleus.response_ids)


def test_padded_vocabulary_rows_are_never_sampled(qwen_dir):
    eng = EmbeddedEngine.from_hf_dir(qwen_dir, vocab_size=40, eos_token_ids=[])
    # Make the padded rows (ids >= 40) dominate: if they were not sliced off they would be sampled every time.
    eng.decoder.params["lm_head.weight"][40:] *= 50.0
    res = eng.generate(PROMPTS, n=4, max_new_tokens=10, temperature=1.0, top_p=1.0, seed=1, topk=5)
    assert max(int(r.max()) for r in res.response_ids) < 40
    assert max(int(r.max()) for r in res.topk_ids) < 40
    assert all(bool((r <= 0.0).all()) for r in res.logprobs)


def test_update_weights_in_memory(qwen_dir, tmp_path):
    other = make_tiny_hf_model(str(tmp_path / "other"), seed=9)
    eng = EmbeddedEngine.from_hf_dir(qwen_dir)
    target = EmbeddedEngine.from_hf_dir(other)
    kw = dict(n=2, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5)
    before = eng.generate(PROMPTS, **kw)
    names = list(target.decoder.params.items())
    buckets = [names[: len(names) // 2], names[len(names) // 2 :]]  # buckets of (hf_name, tensor)
    secs = eng.update_weights(buckets)
    assert secs >= 0.0
    after, want = eng.generate(PROMPTS, **kw), target.generate(PROMPTS, **kw)
    assert _equal(after.response_ids, want.response_ids) and _equal(after.logprobs, want.logprobs)
    assert not _equal(after.logprobs, before.logprobs)
    with pytest.raises(KeyError, match="unexpected weight"):
        eng.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])


def test_sampler_draws_from_the_softmax_and_respects_top_p():
    from megatron_opd.rollout.embedded import _sample

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    draws, lp = _sample(logits.expand(n, -1), 1.0, 1.0, gen)
    # Each draw comes with its temperature-1 logprob.
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[draws], rtol=0, atol=1e-6)
    freq = torch.bincount(draws, minlength=6).float() / n
    # Binomial std <= sqrt(0.25 / n) = 0.0025; 0.01 is 4 sigma.
    assert (freq - torch.softmax(logits, -1)).abs().max().item() < 0.01
    draws, lp = _sample(logits.expand(n, -1), 0.5, 1.0, gen)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[draws], rtol=0, atol=1e-6)
    freq = torch.bincount(draws, minlength=6).float() / n
    assert (freq - torch.softmax(logits / 0.5, -1)).abs().max().item() < 0.01
    # top_p = 0.8: the nucleus is the smallest prefix reaching 0.8 of the mass; renormalised inside, zero outside.
    p = torch.softmax(logits, -1)
    keep = (p.cumsum(-1) - p) < 0.8
    draws, _ = _sample(logits.expand(n, -1), 1.0, 0.8, gen)
    freq = torch.bincount(draws, minlength=6).float() / n
    want = torch.where(keep, p, torch.zeros_like(p))
    assert freq[~keep].sum().item() == 0.0
    assert (freq - want / want.sum()).abs().max().item() < 0.01


def test_decode_step_mask_equals_the_general_path(qwen_dir):
    # decode_step=True attends with two batched GEMMs over an additive mask made of the key-validity row; with left
    # padding and the new key valid it must give the general causal/pad path's (SDPA) hidden states, to fp32
    # rounding (different kernels sum in a different order).
    from megatron_opd.rollout.decoder import KVCache

    dec = EmbeddedEngine.from_hf_dir(qwen_dir).decoder
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    positions = torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]])
    hidden = {}
    for fast in (False, True):
        cache = KVCache(dec.cfg, 2, 5, dec.dtype, dec.device)
        dec.forward(ids, positions, torch.cat([valid, torch.zeros(2, 1, dtype=torch.bool)], 1), cache, 0)
        key_valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], 1)
        step = torch.tensor([[11], [12]])
        hidden[fast] = dec.forward(step, torch.tensor([[2], [4]]), key_valid, cache, 4, decode_step=fast)
    torch.testing.assert_close(hidden[True], hidden[False], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decode_step=True needs one new token"):
        dec.forward(ids, positions, valid, None, 0, decode_step=True)
    with pytest.raises(ValueError, match="decode_step=True needs the KV cache"):
        dec.forward(step, torch.tensor([[2], [4]]), key_valid, None, 4, decode_step=True)
