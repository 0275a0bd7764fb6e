"""Model builders: vocabulary padding, HF config reading, and the GPTModel's layout and keys (one process)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_opd.config.base import ConfigError
from megatron_opd.config.tree import ModelConfig, ParallelConfig
from megatron_opd.model.builders import (
    build_model,
    model_config_from_hf,
    padded_vocab_size,
    student_model_config,
)
from megatron_opd.parallel.state import initialize_parallel

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")

QWEN2_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 151,
    "max_position_embeddings": 512,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, expected",
    [(128, 128, 1, 128), (129, 128, 1, 256), (128, 128, 2, 256), (151936, 128, 4, 152064), (1, 1, 1, 1)],
)
def test_padded_vocab_size(vocab: int, divisible_by: int, tp: int, expected: int) -> None:
    assert padded_vocab_size(vocab, divisible_by, tp) == expected


def test_model_config_from_hf_qwen2(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    cfg = model_config_from_hf(tmp_path)
    assert cfg.architecture == "qwen2" and cfg.add_qkv_bias and cfg.untie_embeddings_and_output_weights
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 64, 176)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size) == (4, 2, 151)
    assert cfg.rotary_base == 1e6 and cfg.params_dtype == "bfloat16" and cfg.hf_path == str(tmp_path)
    assert model_config_from_hf(QWEN2_CONFIG, params_dtype="float32").params_dtype == "float32"


def test_model_config_from_hf_llama_and_rejections() -> None:
    llama = dict(
        QWEN2_CONFIG, architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True
    )
    llama.pop("rope_theta")
    llama["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    cfg = model_config_from_hf(llama)
    assert (
        cfg.architecture == "llama" and not cfg.add_qkv_bias and not cfg.untie_embeddings_and_output_weights
    )
    assert cfg.rotary_base == 5e5
    with pytest.raises(ValueError, match="RoPE scaling"):
        model_config_from_hf(dict(llama, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}))
    with pytest.raises(ValueError, match="unsupported model"):
        model_config_from_hf(dict(QWEN2_CONFIG, architectures=["MistralForCausalLM"], model_type="mistral"))
    # The conversion registry's checks apply to the trainer's reading too (one architecture check).
    with pytest.raises(ValueError, match="attention_bias"):
        model_config_from_hf(dict(llama, attention_bias=True))
    with pytest.raises(ValueError, match="use_sliding_window"):
        model_config_from_hf(dict(QWEN2_CONFIG, use_sliding_window=True))
    with pytest.raises(ValueError, match="mlp_bias"):
        model_config_from_hf(dict(QWEN2_CONFIG, mlp_bias=True))


def test_student_model_config_reads_the_checkpoint_and_forwards_runtime_fields(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    cfg = student_model_config(
        ModelConfig(
            hf_path=str(tmp_path), params_dtype="float32", recompute_activations=True, local_attention="sdpa"
        )
    )
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings) == (2, 64, 151, 512)
    assert cfg.params_dtype == "float32" and cfg.recompute_activations and cfg.local_attention == "sdpa"
    # A given architecture key that agrees with the checkpoint is accepted.
    assert student_model_config(ModelConfig(hf_path=str(tmp_path), vocab_size=151)).vocab_size == 151


@pytest.mark.parametrize(
    "key, given, stored",
    [
        ("num_layers", 4, 2),
        ("vocab_size", 152064, 151),
        ("architecture", "llama", "qwen2"),
        ("rotary_base", 1e4, 1e6),
    ],
)
def test_student_model_config_rejects_a_contradicting_architecture_key(tmp_path, key, given, stored) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    with pytest.raises(ConfigError) as err:
        student_model_config(ModelConfig(hf_path=str(tmp_path), **{key: given}))
    msg = str(err.value)
    assert f"model.{key}" in msg and repr(given) in msg and repr(stored) in msg, msg


def test_build_model_local_spec_keys_and_shapes() -> None:
    initialize_parallel(ParallelConfig(), seed=3)
    cfg = ModelConfig(vocab_size=100, make_vocab_size_divisible_by=64)
    model = build_model(cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    h, kv = cfg.hidden_size, cfg.num_query_groups * cfg.hidden_size // cfg.num_attention_heads
    assert sd["embedding.word_embeddings.weight"].shape == (128, h)  # 100 padded to 128
    assert sd["output_layer.weight"].shape == (128, h)
    assert sd["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (h + 2 * kv, h)
    assert sd["decoder.layers.1.self_attention.linear_qkv.bias"].shape == (h + 2 * kv,)
    assert sd["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * cfg.ffn_hidden_size, h)
    assert sd["decoder.layers.0.input_layernorm.weight"].shape == (h,)
    assert "decoder.final_layernorm.weight" in sd
    tokens = torch.randint(0, 100, (2, 7))
    logits = model(tokens, torch.arange(7).expand(2, 7), None)
    assert logits.shape == (2, 7, 128) and torch.isfinite(logits).all()
    # Causality: changing the last token leaves earlier positions' logits unchanged.
    tokens2 = tokens.clone()
    tokens2[:, -1] = (tokens2[:, -1] + 1) % 100
    logits2 = model(tokens2, torch.arange(7).expand(2, 7), None)
    torch.testing.assert_close(logits2[:, :-1], logits[:, :-1], rtol=0, atol=0)


def test_build_model_llama_tied_has_no_output_layer() -> None:
    initialize_parallel(ParallelConfig(), seed=3)
    cfg = ModelConfig(architecture="llama", add_qkv_bias=False, untie_embeddings_and_output_weights=False)
    sd = build_model(cfg).state_dict()
    assert "output_layer.weight" not in sd
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in sd


def test_transformer_config_warns_nothing() -> None:
    """Megatron's default cuda_graph_scope ("full") warns "full scope is deprecated" in every process."""
    import warnings

    from megatron_opd.model.builders import transformer_config

    initialize_parallel(ParallelConfig(), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = transformer_config(ModelConfig(), use_te=False)
    assert cfg.cuda_graph_scope == []


def test_masked_softmax_fusion_follows_the_kernels(monkeypatch) -> None:
    """The fused softmax is on only when CUDA is present AND its kernels import (megatron-core's wheel lacks
    them); without them Megatron would fail at the first attention call."""
    from megatron_opd.model import builders

    initialize_parallel(ParallelConfig(), seed=0)
    monkeypatch.setattr(builders.torch.cuda, "is_available", lambda: True)
    missing = []
    monkeypatch.setattr(builders, "_importable", lambda name: missing.append(name) or False)
    assert not builders.masked_softmax_fusion_available()
    assert missing and missing[0] in builders._SOFTMAX_KERNELS
    assert builders.transformer_config(ModelConfig(), use_te=False).masked_softmax_fusion is False
    monkeypatch.setattr(builders, "_importable", lambda name: True)
    assert builders.masked_softmax_fusion_available()
    assert builders.transformer_config(ModelConfig(), use_te=False).masked_softmax_fusion is True
    monkeypatch.setattr(builders.torch.cuda, "is_available", lambda: False)
    assert not builders.masked_softmax_fusion_available()  # CPU: off even if the kernels were importable
