"""The HF <-> Megatron name/shape rules on state dicts of tiny ``transformers`` models (no Megatron model):
every HF tensor is covered once, the round trip is exact, and unsupported or inconsistent inputs fail clearly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from megatron_opd.model.builders import model_config_from_hf, padded_vocab_size
from megatron_opd.model.hf_conversion import architecture as A
from megatron_opd.model.hf_conversion.live import check_tensor_parallel

SIZES = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "qwen2":
        config = Qwen2Config(**SIZES, tie_word_embeddings=False, rope_theta=1e6)
        return config, Qwen2ForCausalLM(config)
    config = LlamaConfig(**SIZES, tie_word_embeddings=True)
    return config, LlamaForCausalLM(config)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_rules_cover_the_hf_state_dict_and_round_trip_exactly(kind: str) -> None:
    config, model = _tiny(kind)
    hf_dict = config.to_dict()
    hf_dict["architectures"] = [type(model).__name__]
    arch = A.architecture_for_hf_config(hf_dict)
    assert arch.name == kind
    cfg = model_config_from_hf(hf_dict)
    state = model.state_dict()
    if not cfg.untie_embeddings_and_output_weights:
        state.pop("lm_head.weight")  # transformers shows the tied copy; save_pretrained does not write it
    rules = arch.rules(cfg)
    covered = [n for r in rules for n in r.hf]
    assert sorted(covered) == sorted(state), "every HF tensor is named by exactly one rule"
    padded = padded_vocab_size(cfg.vocab_size, 16, 1)
    back = {}
    for rule in rules:
        megatron = A.to_megatron(rule, [state[n] for n in rule.hf], cfg, padded)
        if rule.kind == "vocab":
            assert megatron.shape == (padded, cfg.hidden_size) and not megatron[cfg.vocab_size :].any()
        back.update(A.to_hf(rule, megatron, cfg))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[n], state[n]) for n in state)
    assert any(r.megatron.endswith("linear_qkv.bias") for r in rules) == (kind == "qwen2")


def test_stage_subsets_and_megatron_name_spellings() -> None:
    cfg = model_config_from_hf(dict(_tiny("qwen2")[0].to_dict(), architectures=["Qwen2ForCausalLM"]))
    last_stage = A.decoder_rules(cfg, [1], embedding=False, output=True)
    assert {r.layer for r in last_stage} == {1, None}
    assert last_stage[-1].hf == ("lm_head.weight",)
    name = "decoder.layers.1.input_layernorm.weight"
    te = "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    assert A.megatron_name_candidates(name) == (name, te)
    assert A.resolve_megatron_name(name, {te}) == te
    rule = next(r for r in A.decoder_rules(cfg) if r.megatron == name)
    stacked = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert A.checkpoint_key(rule, {stacked}) == (stacked, 1)
    with pytest.raises(A.ConversionError, match="no tensor"):
        A.checkpoint_key(rule, {"embedding.word_embeddings.weight"})


def test_shape_mismatch_names_the_tensor_and_the_config() -> None:
    config, model = _tiny("qwen2")
    cfg = model_config_from_hf(
        dict(config.to_dict(), architectures=["Qwen2ForCausalLM"], num_key_value_heads=4)
    )
    rule = next(r for r in A.decoder_rules(cfg) if r.megatron.endswith("0.self_attention.linear_qkv.weight"))
    state = model.state_dict()
    with pytest.raises(A.ConversionError, match=r"k_proj.weight has shape \(32, 64\).*implies \(64, 64\)"):
        A.to_megatron(rule, [state[n] for n in rule.hf], cfg, 112)


def test_unsupported_models_and_layouts_fail_with_the_reason() -> None:
    with pytest.raises(A.ConversionError, match="supported: .*llama.*qwen2|supported: .*qwen2.*llama"):
        A.architecture_for_hf_config({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    with pytest.raises(A.ConversionError, match="unknown architecture 'gpt2'; supported: llama, qwen2"):
        A.get_architecture("gpt2")
    qwen = A.get_architecture("qwen2")
    with pytest.raises(A.ConversionError, match="sliding"):
        qwen.check_config({"use_sliding_window": True})
    with pytest.raises(A.ConversionError, match="hidden_act"):
        qwen.check_config({"hidden_act": "gelu"})
    with pytest.raises(A.ConversionError, match="attention_bias"):
        A.get_architecture("llama").check_config({"attention_bias": True})
    cfg = model_config_from_hf(dict(_tiny("qwen2")[0].to_dict(), architectures=["Qwen2ForCausalLM"]))
    check_tensor_parallel(cfg, 2)
    with pytest.raises(A.ConversionError, match="tensor-parallel size 4 does not divide num_query_groups"):
        check_tensor_parallel(cfg, 4)


def test_written_config_is_read_back_to_the_same_model_config() -> None:
    for kind in ("qwen2", "llama"):
        config, model = _tiny(kind)
        cfg = model_config_from_hf(dict(config.to_dict(), architectures=[type(model).__name__]))
        arch = A.get_architecture(kind)
        again = model_config_from_hf(arch.write_config(cfg))
        assert again == cfg
