"""Core attention for Megatron's local layer spec through ``torch.nn.functional.scaled_dot_product_attention``.

Why it exists: without Transformer-Engine the student runs Megatron's local spec, whose ``DotProductAttention``
materialises the [b, heads, s, s] scores (16k tokens x 12 heads of a 1.5B model: 6 GiB per sequence in bf16,
times the saved softmax) and needs apex's fused softmax kernels for speed. torch's SDPA picks a flash or
memory-efficient kernel on CUDA (O(s) memory) and a math kernel on CPU, with causal masking and grouped-query
attention built in. ``SDPAttention`` is a drop-in ``core_attention`` module: same constructor and forward as
``DotProductAttention`` (no dropout, no softmax offset, no packed sequences: none of which the student uses).
It also reads a ``SharedPromptLayout`` passed as the attention mask (``model.shared_prompts``): the rollouts of
one prompt packed in one row, attended to as the separate sequences they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_opd.model.shared_prompts import SharedPromptLayout


class SDPAttention(MegatronModule):
    """Causal (or masked) attention on this rank's heads. Inputs are Megatron's [s, b, heads, head_dim] layout.

    Args (as ``DotProductAttention``'s): ``config``, ``layer_number``, ``attn_mask_type`` (causal unless a
    mask is passed), ``attention_type``, ``attention_dropout`` (must be 0), ``softmax_scale`` (default
    1/sqrt(head_dim)); ``cp_comm_type`` and ``pg_collection`` are accepted for the signature.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"SDPAttention does not implement attention dropout (got {dropout}); set it to 0"
            )
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism (use CP = 1)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention supports only the vanilla softmax, not {config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention does not implement sliding-window attention")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        if config.apply_query_key_layer_scaling:  # Megatron divides the scale by the layer number then
            self.softmax_scale /= max(1, layer_number)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask (Megatron's: True = masked out,
        broadcastable to [b, np, sq, sk]), a ``SharedPromptLayout`` (b packed rows of prompts and their
        responses: causal attention within each unpacked sequence) or None -> context [sq, b, np * hn]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if isinstance(attention_mask, SharedPromptLayout):
            q, k, v = (attention_mask.to_unpacked(t) for t in (query, key, value))  # [B, heads, S, hn]
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1]
            )
            return attention_mask.to_packed(out, query.shape[1], query.shape[0])
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if attention_mask is None:
            causal, attn_mask = mask_type == AttnMaskType.causal and q.shape[2] > 1, None
        else:
            causal, attn_mask = False, ~attention_mask.bool()  # SDPA's boolean mask: True = attend
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
