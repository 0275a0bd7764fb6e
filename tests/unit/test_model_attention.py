"""SDPAttention (model/attention.py) is a drop-in for Megatron's DotProductAttention: same output on CPU in fp32
(causal, GQA, an explicit mask), and the training step gives the same loss with either."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_opd.config.tree import LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_opd.model import builders
from megatron_opd.model.attention import SDPAttention
from megatron_opd.model.builders import build_model_chunks, transformer_config
from megatron_opd.parallel.state import initialize_parallel
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.optimizer import setup_training
from megatron_opd.training.step import TrainStep

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")

MODEL = ModelConfig(vocab_size=100, num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2)  # fmt: skip


def _modules():
    initialize_parallel(ParallelConfig(), seed=3)
    cfg = transformer_config(MODEL, use_te=False)
    ref = DotProductAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    sdpa = SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return ref, sdpa


def _qkv(s: int = 7, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hn = MODEL.hidden_size // MODEL.num_attention_heads
    q = torch.randn(s, b, MODEL.num_attention_heads, hn, generator=g)
    k = torch.randn(s, b, MODEL.num_query_groups, hn, generator=g)
    v = torch.randn(s, b, MODEL.num_query_groups, hn, generator=g)
    return q, k, v


def test_sdpa_equals_dot_product_attention_causal_gqa() -> None:
    ref, sdpa = _modules()
    q, k, v = _qkv()
    expected, got = ref(q, k, v, None), sdpa(q, k, v, None)
    assert got.shape == expected.shape == (7, 3, MODEL.hidden_size)
    # fp32 on both sides, the same softmax in a different order of operations: agreement to ~1e-6 relative.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # The result is causal: changing the last key/value changes only the last query's output.
    k2, v2 = k.clone(), v.clone()
    k2[-1] += 1.0
    v2[-1] += 1.0
    changed = sdpa(q, k2, v2, None)
    torch.testing.assert_close(changed[:-1], got[:-1], rtol=0, atol=0)
    assert not torch.allclose(changed[-1], got[-1])


def test_sdpa_equals_dot_product_attention_with_explicit_mask() -> None:
    ref, sdpa = _modules()
    q, k, v = _qkv(s=6, b=2, seed=1)
    # Megatron's convention: True = masked out. Causal plus one extra masked key per sequence.
    mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1).expand(2, 1, 6, 6).clone()
    mask[0, 0, 3:, 1] = True
    torch.testing.assert_close(sdpa(q, k, v, mask), ref(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_local_attention_switch() -> None:
    def sdpa_cls(cfg: ModelConfig) -> type:
        return builders.layer_spec(cfg, use_te=False).submodules.self_attention.submodules.core_attention

    assert sdpa_cls(dataclasses.replace(MODEL, local_attention="sdpa")) is SDPAttention
    assert sdpa_cls(dataclasses.replace(MODEL, local_attention="megatron")) is DotProductAttention
    # 'auto' (the default) is SDPA on every device, CPU included.
    assert MODEL.local_attention == "auto" and builders.use_sdpa_attention(MODEL)


def _batch(seed: int = 0) -> OPDBatch:
    from megatron_opd.algorithms.horizon import HorizonWindow

    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, 100, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (6,), generator=g)
    ]
    resps = [
        torch.randint(0, 100, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 10, (6,), generator=g)
    ]
    teacher = [(-3 * torch.rand(len(r), generator=g)).tolist() for r in resps]
    return OPDBatch.from_lists(prompts, resps, teacher, HorizonWindow(0, 8, 10))


def test_training_step_same_loss_with_sdpa() -> None:
    results = {}
    for impl in ("megatron", "sdpa"):
        initialize_parallel(ParallelConfig(), seed=5)
        chunks = build_model_chunks(dataclasses.replace(MODEL, local_attention=impl))
        objs = setup_training(chunks, OptimizerConfig(lr=1e-3), total_steps=4)
        step = TrainStep(
            objs.model, objs.optimizer, objs.scheduler, LossConfig(impl="reference"), vocab_size=100
        )
        results[impl] = [step([_batch(0)]), step([_batch(1)])]
    for a, b in zip(results["megatron"], results["sdpa"], strict=True):
        # Same weights (same seed), same fp32 math up to summation order: losses agree to fp32 rounding; the
        # second step also checks that the gradients (hence the first update) agree.
        assert b.loss == pytest.approx(a.loss, rel=1e-5, abs=1e-6)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
