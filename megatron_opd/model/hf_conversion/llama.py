"""Llama (``LlamaForCausalLM``): no QKV bias by default, GQA, RoPE base from config.json, often tied embeddings.

Why it exists: the config.json facts specific to Llama. ``attention_bias`` maps to Megatron's ``add_qkv_bias``
(an output-projection bias is not supported, nor ``mlp_bias``); RoPE scaling variants (Llama 3.1's 'llama3') are
rejected rather than converted into a model that silently computes something else.
"""

from __future__ import annotations

from typing import Any

from megatron_opd.config.tree import ModelConfig
from megatron_opd.model.hf_conversion.architecture import (
    Architecture,
    ConversionError,
    check_common_config,
    common_config_dict,
    register,
)


def check_config(hf_config: dict[str, Any]) -> None:
    """Reject what a Megatron Llama cannot compute: attention biases (HF puts one on o_proj too), MLP biases."""
    if hf_config.get("attention_bias"):
        raise ConversionError(
            "config.json sets attention_bias=true (biases on q/k/v/o); not supported for Llama"
        )
    check_common_config(hf_config)


def write_config(cfg: ModelConfig) -> dict[str, Any]:
    """``ModelConfig`` -> a config.json ``transformers`` loads as ``LlamaForCausalLM``."""
    if cfg.add_qkv_bias:
        raise ConversionError("a Llama config.json cannot express QKV biases without an o_proj bias")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **common_config_dict(cfg),
        "attention_bias": False,
        "mlp_bias": False,
    }


LLAMA = register(
    Architecture(
        name="llama",
        hf_architectures=("LlamaForCausalLM",),
        model_type="llama",
        add_qkv_bias=False,
        check_config=check_config,
        write_config=write_config,
    )
)
