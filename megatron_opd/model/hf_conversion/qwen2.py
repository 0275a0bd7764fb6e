"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): QKV bias, GQA, RoPE base 1e6 by default, tied or untied embeddings.

Why it exists: the config.json facts specific to Qwen2. The paper's students and teachers
(DeepSeek-R1-Distill-Qwen-1.5B, OpenMath-Nemotron-1.5B, the JustRL models) are all Qwen2; their embedding has
151,936 rows while the tokenizer has fewer, and ``vocab_size`` here is that row count. Sliding-window attention
(``use_sliding_window``) is not supported by the Megatron model and is rejected.
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
    """Reject what a Megatron Qwen2 cannot compute: sliding-window attention, non-SwiGLU activations."""
    if hf_config.get("use_sliding_window"):
        raise ConversionError(
            "config.json enables use_sliding_window; sliding-window attention is not supported"
        )
    check_common_config(hf_config)


def write_config(cfg: ModelConfig) -> dict[str, Any]:
    """``ModelConfig`` -> a config.json ``transformers`` loads as ``Qwen2ForCausalLM``."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **common_config_dict(cfg),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
    }


QWEN2 = register(
    Architecture(
        name="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        model_type="qwen2",
        add_qkv_bias=True,
        check_config=check_config,
        write_config=write_config,
    )
)
