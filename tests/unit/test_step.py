"""The OPD training step in one process: the loss equals the reference computed by hand, micro-batching does
not change the update, tokens outside the window cost nothing, non-finite steps are skipped, the fused path
matches, and the LR schedule has the documented shape."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_opd.algorithms.advantage import opd_advantages
from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.config.tree import LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_opd.loss import reference
from megatron_opd.model.builders import build_model_chunks
from megatron_opd.parallel.state import initialize_parallel
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.optimizer import setup_training
from megatron_opd.training.step import TrainStep

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")

VOCAB = 100  # padded to 128: the padding mask is exercised
MODEL = ModelConfig(vocab_size=VOCAB, num_layers=2, hidden_size=32, ffn_hidden_size=64)


WINDOW = HorizonWindow(0, 8, 12)


def _batch(seed: int = 0, n: int = 8, window=WINDOW, topk: int = 0) -> OPDBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, VOCAB, (int(k),), generator=g).tolist()
        for k in torch.randint(1, 6, (n,), generator=g)
    ]
    resps = [
        torch.randint(0, VOCAB, (int(k),), generator=g).tolist()
        for k in torch.randint(1, 12, (n,), generator=g)
    ]
    teacher = [(-3 * torch.rand(len(r), generator=g)).tolist() for r in resps]
    kw = {}
    if topk:
        kw["topk_ids"] = [torch.randint(0, VOCAB, (len(r), topk), generator=g) for r in resps]
        kw["teacher_topk_logprobs"] = [
            torch.log_softmax(torch.randn(len(r), topk, generator=g), -1) for r in resps
        ]
    return OPDBatch.from_lists(prompts, resps, teacher, window, **kw)


def _setup(
    opt: OptimizerConfig | None = None, loss: LossConfig | None = None, impl: str = "reference", seed=11
):
    initialize_parallel(ParallelConfig(), seed=seed)
    chunks = build_model_chunks(MODEL)
    objs = setup_training(chunks, opt or OptimizerConfig(lr=1e-3), total_steps=20)
    step = TrainStep(
        objs.model,
        objs.optimizer,
        objs.scheduler,
        dataclasses.replace(loss or LossConfig(), impl=impl),
        vocab_size=VOCAB,
    )
    return chunks, objs, step


def _params(chunks) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in chunks[0].named_parameters()}


def _reference_loss(chunk, batch: OPDBatch, loss_cfg: LossConfig) -> float:
    """The objective computed by hand on the full logits: the specification the step must reproduce."""
    with torch.no_grad():
        L = batch.tokens.shape[1]
        logits = chunk(batch.tokens, torch.arange(L).expand(batch.size, L), None).float()
        logits[..., VOCAB:] = -math.inf
        logit_pos, targets = batch.response_positions()
        rows = torch.gather(logits, 1, logit_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        logp = torch.log_softmax(rows, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = batch.response_mask()
        adv = opd_advantages(batch.teacher_logprobs, logp, mask, loss_cfg.gamma)
        kl = None
        if batch.topk_ids is not None:
            s_k = torch.log_softmax(rows, -1).gather(-1, batch.topk_ids)
            kl = reference.topk_reverse_kl(s_k, batch.teacher_topk_logprobs, loss_cfg.topk_renormalize)
        return float(
            reference.opd_loss(
                logp, adv, mask, topk_kl=kl, pg_coef=loss_cfg.pg_coef, topk_kl_coef=loss_cfg.topk_kl_coef,
                normalization=loss_cfg.normalization,
            )
        )  # fmt: skip


@pytest.mark.parametrize(
    "loss_cfg, topk",
    [
        (LossConfig(), 0),
        (LossConfig(gamma=0.9, topk_kl_coef=0.5, normalization="sequence_mean"), 4),
    ],
)
def test_loss_matches_hand_computed_reference(loss_cfg: LossConfig, topk: int) -> None:
    chunks, _, step = _setup(loss=loss_cfg)
    batch = _batch(topk=topk, window=HorizonWindow(2, 9, 12))
    expected = _reference_loss(chunks[0], batch, loss_cfg)
    result = step(batch.split(4))
    # Same fp32 math, different order of summation over micro-batches: agreement to float32 rounding.
    assert result.loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert not result.skipped and math.isfinite(result.grad_norm) and result.grad_norm > 0
    assert result.num_tokens == batch.num_distilled_tokens()
    assert int(result.position_count.sum()) == batch.num_distilled_tokens()
    assert result.position_count[:2].sum() == 0  # window starts at 2
    if topk:
        assert math.isfinite(result.topk_kl_mean) and result.topk_kl_mean >= 0  # renormalised KL is >= 0


def test_micro_batching_does_not_change_the_update() -> None:
    batch = _batch(n=8)
    results, weights = [], []
    for n_micro in (1, 4):
        chunks, _, step = _setup(seed=5)
        results.append(step(batch.split(n_micro)))
        weights.append(_params(chunks))
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-5)
    assert results[0].grad_norm == pytest.approx(results[1].grad_norm, rel=1e-4)
    # Adam's first step moves each weight by about lr * sign(grad): identical gradients up to fp32 rounding give
    # identical weights except where a gradient is ~0; 1e-5 is 1% of lr.
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=1e-5, msg=k)


def test_tokens_outside_the_window_cost_nothing() -> None:
    chunks, _, step = _setup()
    window = HorizonWindow(0, 3, 12)
    batch = _batch(window=window)
    before = _params(chunks)
    other = OPDBatch.from_lists(
        [b[: int(p)].tolist() for b, p in zip(batch.tokens, batch.prompt_lengths)],
        [
            (b[int(p) : int(p) + int(r)] + 7 * (torch.arange(int(r)) >= 3)).remainder(VOCAB).tolist()
            for b, p, r in zip(batch.tokens, batch.prompt_lengths, batch.response_lengths)
        ],
        [(t + 5 * (torch.arange(t.shape[0]) >= 3)).tolist() for t in batch.teacher_logprobs],
        window,
    )
    expected = _reference_loss(chunks[0], batch, LossConfig())
    assert _reference_loss(chunks[0], other, LossConfig()) == pytest.approx(expected, rel=1e-6)
    r = step([other])
    assert r.loss == pytest.approx(expected, rel=1e-5) and r.position_count.shape == (3,)
    assert any(not torch.equal(before[k], v) for k, v in _params(chunks).items())


def test_non_finite_loss_skips_the_update() -> None:
    chunks, objs, step = _setup(opt=OptimizerConfig(lr=1e-3, lr_warmup_steps=3))
    batch = _batch()
    batch.teacher_logprobs[0, 0] = float("nan")
    before, num_steps = _params(chunks), objs.scheduler.num_steps
    r = step([batch])
    assert r.skipped and r.skip_reason == "non-finite loss"
    assert objs.scheduler.num_steps == num_steps
    for k, v in _params(chunks).items():
        assert torch.equal(before[k], v), k
    r = step([_batch()])
    assert not r.skipped and r.lr == pytest.approx(1e-3 / 3)


def test_fused_chunked_path_matches_reference() -> None:
    pytest.importorskip("megatron_opd.loss.adapter")
    batch = _batch(topk=4)
    cfg = LossConfig(topk_kl_coef=0.3, chunk_size=5)
    res = {}
    for impl in ("reference", "chunked"):
        chunks, _, step = _setup(loss=cfg, impl=impl, seed=9)
        res[impl] = (step(batch.split(2)), _params(chunks))
    # Same math in another order (chunked softmax): fp32 rounding only.
    assert res["chunked"][0].loss == pytest.approx(res["reference"][0].loss, rel=1e-5)
    assert res["chunked"][0].grad_norm == pytest.approx(res["reference"][0].grad_norm, rel=1e-4)


def test_compute_logprobs_matches_log_softmax() -> None:
    chunks, _, step = _setup()
    batch = _batch(window=HorizonWindow(0, 2, 12))
    (lp,) = step.compute_logprobs([batch])
    with torch.no_grad():
        L = batch.tokens.shape[1]
        logits = chunks[0](batch.tokens, torch.arange(L).expand(batch.size, L), None)[..., :VOCAB]
        full = torch.log_softmax(logits.float(), -1)
    for b in range(batch.size):
        P, R = int(batch.prompt_lengths[b]), int(batch.response_lengths[b])
        want = full[b, P - 1 : P - 1 + R].gather(-1, batch.tokens[b, P : P + R, None]).squeeze(-1)
        torch.testing.assert_close(lp[b, :R], want, rtol=0, atol=1e-5)  # whole response, not just the window


@pytest.mark.parametrize(
    "style, warmup, expected",
    [
        ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
        ("linear", 2, [0.5, 1.0, 0.5, 0.0]),  # warmup reaches lr at update 1, decay min_lr at update 3
        ("cosine", 0, [0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]),
    ],
)
def test_lr_schedule(style: str, warmup: int, expected: list[float]) -> None:
    initialize_parallel(ParallelConfig(), seed=0)
    chunks = build_model_chunks(MODEL)
    cfg = OptimizerConfig(lr=1.0, lr_decay_style=style, lr_warmup_steps=warmup, lr_decay_steps=4)
    objs = setup_training(chunks, cfg, total_steps=100)
    lrs = []
    for _ in expected:
        lrs.append(objs.optimizer.param_groups[0]["lr"])
        objs.scheduler.step(1)
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_activation_recompute_gives_the_same_steps() -> None:
    """Recompute re-runs each layer's forward in backward (with the CPU redirects re-entered): same numbers."""
    batch = _batch()
    losses = []
    for recompute in (False, True):
        initialize_parallel(ParallelConfig(), seed=21)
        chunks = build_model_chunks(dataclasses.replace(MODEL, recompute_activations=recompute))
        objs = setup_training(chunks, OptimizerConfig(lr=1e-3), total_steps=20)
        step = TrainStep(
            objs.model, objs.optimizer, objs.scheduler, LossConfig(impl="reference"), vocab_size=VOCAB
        )
        losses.append([step(batch.split(2)).loss for _ in range(2)])
    assert losses[0] == losses[1]  # the same operations in the same order: bit-identical


@pytest.mark.parametrize(
    "tp, sp, fp8, expected",
    [(1, False, False, 1), (4, False, False, 1), (4, True, False, 4), (1, False, True, 8), (2, False, True, 8),
     (2, True, True, 16), (8, True, True, 64)],
)  # fmt: skip
def test_seq_padding_multiple(tp: int, sp: bool, fp8: bool, expected: int) -> None:
    from megatron_opd.training.step import seq_padding_multiple

    assert seq_padding_multiple(tp, sp, fp8) == expected
    # The property TE's FP8 needs: each rank's share of any padded length is a multiple of 8.
    if fp8:
        assert (expected // (tp if sp else 1)) % 8 == 0
    with pytest.raises(ValueError, match="tp_size"):
        seq_padding_multiple(0, False, False)


def test_padding_to_the_fp8_multiple_does_not_change_the_loss(monkeypatch) -> None:
    from megatron_opd.training import step as step_mod

    batch = _batch(topk=2)
    cfg = LossConfig(topk_kl_coef=0.2)
    res = {}
    orig = step_mod._prepare
    prepared: list = []

    def recording_prepare(*a, **k):
        prepared.append(orig(*a, **k))
        return prepared[-1]

    monkeypatch.setattr(step_mod, "_prepare", recording_prepare)
    for multiple in (1, 16):
        monkeypatch.setattr(step_mod, "seq_padding_multiple", lambda tp, sp, fp8, m=multiple: m)
        chunks, _, step = _setup(loss=cfg, seed=4)
        prepared.clear()
        res[multiple] = (step(batch.split(2)), step([_batch(seed=1)]))
        assert prepared and all(mb.tokens.shape[1] % multiple == 0 for mb in prepared)
    assert batch.tokens.shape[1] % 16  # the test pads something
    for a, b in zip(res[1], res[16], strict=True):
        # Padding lies after every real token (causal attention): only summation order could differ.
        assert b.loss == pytest.approx(a.loss, rel=1e-5, abs=1e-6)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)


def test_grads_finite_one_sync_and_detects_a_nan(monkeypatch) -> None:
    chunks, objs, step = _setup()
    step([_batch()])  # fills the gradient buffers
    syncs: list[str] = []
    depth = [0]  # parallel/cpu_compat's torch-function mode re-enters the patched method: count outer calls

    def counting(name, orig):
        def wrapper(self, *a):
            if depth[0] == 0:
                syncs.append(name)
            depth[0] += 1
            try:
                return orig(self, *a)
            finally:
                depth[0] -= 1

        return wrapper

    for name in ("item", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    assert step._grads_finite()
    n_params = sum(1 for _ in chunks[0].parameters())
    assert syncs == ["item"], f"{len(syncs)} host syncs for {n_params} parameters"
    params = list(chunks[0].parameters())
    g = getattr(params[len(params) // 2], "main_grad", None)
    g = params[len(params) // 2].grad if g is None else g
    g.view(-1)[0] = float("nan")
    syncs.clear()
    assert not step._grads_finite() and syncs == ["item"]
    g.view(-1)[0] = float("inf")
    assert not step._grads_finite()
