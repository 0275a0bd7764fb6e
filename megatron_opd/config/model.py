"""The ``model`` section of the config tree: the student's architecture and how it is run.

Why it exists: the student's fields in one place (``config/tree.py`` gathers every section). With
``model.hf_path`` set, the architecture comes from the checkpoint (``model.builders.student_model_config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_opd.config.base import check_range, fail

ParamsDtype = Literal["float32", "bfloat16", "float16"]


@dataclass(kw_only=True)
class ModelConfig:
    """The student's architecture (and where its weights come from)."""

    hf_path: str | None = None
    """Hugging Face model directory (config.json + safetensors). When set, the architecture fields below
    (architecture ... untie_embeddings_and_output_weights) are read from its config.json: leave them out; one
    given with a value the checkpoint contradicts is an error."""
    architecture: Literal["qwen2", "llama"] = "qwen2"
    """Model family: 'qwen2' (QKV bias, untied embeddings by default) or 'llama'."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 176
    """SwiGLU intermediate size."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int = 2
    """Number of key/value heads (GQA); equal to num_attention_heads for multi-head attention."""
    vocab_size: int = 128
    """Rows of the embedding as stored in the HF checkpoint (may exceed the tokenizer's size, e.g. Qwen)."""
    max_position_embeddings: int = 2048
    """Longest sequence the position embedding supports."""
    rotary_base: float = 1_000_000.0
    """RoPE base (theta): 1e6 for Qwen2, 1e4 or 5e5 for Llama variants."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    add_qkv_bias: bool = True
    """Bias on the Q, K, V projections (Qwen2: true, Llama: false)."""
    untie_embeddings_and_output_weights: bool = True
    """Separate LM-head weight (true) or the LM head tied to the input embedding (false)."""
    make_vocab_size_divisible_by: int = 128
    """The Megatron embedding is padded to a multiple of this times the tensor-parallel size."""
    params_dtype: ParamsDtype = "float32"
    """Parameter and activation dtype; 'bfloat16' trains with fp32 main params in the optimizer."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 recipe for Transformer-Engine layers (GPU with TE only); None disables FP8."""
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    """Layer spec: Transformer-Engine when it imports ('auto'), or Megatron's local spec."""
    local_attention: Literal["auto", "sdpa", "megatron"] = "auto"
    """Core attention of Megatron's local spec (no effect with TE layers): torch SDPA, flash/memory-efficient
    kernels with O(s) memory ('sdpa'), or Megatron's DotProductAttention with [s, s] scores ('megatron');
    'auto' is 'sdpa' on every device: on CPU too its fused kernel beats the [s, s] scores (the CPU main job's train
    phase: 0.13 s against 0.145 s a step, same losses to fp32 rounding)."""
    recompute_activations: bool = False
    """Recompute each transformer layer in the backward pass to save activation memory."""

    def __post_init__(self) -> None:
        for key in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
        ):
            check_range(f"model.{key}", getattr(self, key), 1)
        check_range("model.vocab_size", self.vocab_size, 2)
        check_range("model.make_vocab_size_divisible_by", self.make_vocab_size_divisible_by, 1)
        if self.hidden_size % self.num_attention_heads:
            fail(
                "model.hidden_size",
                self.hidden_size,
                f"a multiple of num_attention_heads ({self.num_attention_heads})",
            )
        if self.num_attention_heads % self.num_query_groups:
            fail(
                "model.num_query_groups",
                self.num_query_groups,
                f"a divisor of num_attention_heads ({self.num_attention_heads})",
            )
        check_range("model.rotary_base", self.rotary_base, 0, lo_open=True)
        check_range("model.norm_epsilon", self.norm_epsilon, 0, lo_open=True)
        if self.fp8 is not None and self.params_dtype == "float32":
            fail("model.fp8", self.fp8, "None with params_dtype 'float32' (FP8 training runs in bf16)")
