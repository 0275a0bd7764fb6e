"""The HF <-> Megatron name and shape map of a Llama-family decoder, and the registry of architectures.

Why it exists: Qwen2 and Llama share one decoder layout (RMSNorm, GQA attention, SwiGLU MLP, RoPE); they differ in
their Hugging Face config (QKV bias, tied embeddings, RoPE base, class names). The map itself is therefore written
once here as a list of ``Rule``s derived from a ``ModelConfig`` - one rule per Megatron tensor, naming the HF
tensors it is made of and how (copy, QKV interleave, gate/up fusion, vocabulary padding). The per-architecture
modules (``qwen2.py``, ``llama.py``) hold what is specific to each: checking and writing their ``config.json``
(``builders.model_config_from_hf`` reads it into a ``ModelConfig``).
Every converter (files on disk, live weight sync, loading HF weights into a sharded model) walks these rules.

Megatron names are those of the local layer spec (``input_layernorm``, ``pre_mlp_layernorm``); the
Transformer-Engine spec fuses those norms into the next linear layer (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``). ``resolve_megatron_name`` picks whichever a given model has.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron_opd.config.tree import ModelConfig
from megatron_opd.model.hf_conversion import tensors as T
from megatron_opd.utils.errors import OPDError

RuleKind = Literal["copy", "qkv", "gate_up", "vocab"]

_TE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class ConversionError(OPDError, ValueError):
    """A checkpoint does not fit its config or the requested layout; the message says what and where."""


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensors it is made of.

    ``megatron``: the local-spec name with the *global* layer index (``decoder.layers.3.mlp.linear_fc1.weight``).
    ``hf``: HF names in the order the combining function takes them (q, k, v / gate, up / the one tensor).
    ``kind``: 'copy', 'qkv' (interleave per query group), 'gate_up' (fuse), 'vocab' (pad rows).
    ``tp_dim``: the tensor-parallel partition dimension in Megatron, None when replicated (norms).
    ``tp_layout``: how the TP shards are cut ('gate_up' for ``linear_fc1``).
    ``layer``: the global layer index, None outside the decoder layers.
    """

    megatron: str
    hf: tuple[str, ...]
    kind: RuleKind
    tp_dim: int | None
    tp_layout: T.TPLayout = "plain"
    layer: int | None = None


def head_dim(cfg: ModelConfig) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def decoder_rules(
    cfg: ModelConfig, layers: Sequence[int] | None = None, *, embedding: bool = True, output: bool = True
) -> list[Rule]:
    """The rules for the given global layers (all by default), plus the embedding and the final norm/LM head.

    ``embedding``/``output`` select the first-stage and last-stage tensors (a pipeline stage asks only for its own).
    The LM head appears only with untied embeddings (HF then stores ``lm_head.weight``).
    """
    rules: list[Rule] = []
    if embedding:
        rules.append(Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0))
    for i in range(cfg.num_layers) if layers is None else layers:
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = h + "self_attn."
        rules += [
            Rule(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy", None, layer=i),
            Rule(
                m + "self_attention.linear_qkv.weight",
                tuple(f"{attn}{p}_proj.weight" for p in "qkv"),
                "qkv",
                0,
                layer=i,
            ),
        ]
        if cfg.add_qkv_bias:
            rules.append(
                Rule(
                    m + "self_attention.linear_qkv.bias",
                    tuple(f"{attn}{p}_proj.bias" for p in "qkv"),
                    "qkv",
                    0,
                    layer=i,
                )
            )
        rules += [
            Rule(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "copy", 1, layer=i),
            Rule(
                m + "pre_mlp_layernorm.weight",
                (h + "post_attention_layernorm.weight",),
                "copy",
                None,
                layer=i,
            ),
            Rule(
                m + "mlp.linear_fc1.weight",
                (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                "gate_up",
                0,
                "gate_up",
                layer=i,
            ),
            Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy", 1, layer=i),
        ]
    if output:
        rules.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", None))
        if cfg.untie_embeddings_and_output_weights:
            rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab", 0))
    return rules


def expected_hf_shapes(rule: Rule, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """The shape each of ``rule.hf`` must have under ``cfg`` (used to reject a checkpoint that does not fit)."""
    hid, ffn, hd = cfg.hidden_size, cfg.ffn_hidden_size, head_dim(cfg)
    q_rows, kv_rows = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
    name = rule.megatron
    if rule.kind == "vocab":
        return [(cfg.vocab_size, hid)]
    if rule.kind == "qkv":
        if name.endswith("bias"):
            return [(q_rows,), (kv_rows,), (kv_rows,)]
        return [(q_rows, hid), (kv_rows, hid), (kv_rows, hid)]
    if rule.kind == "gate_up":
        return [(ffn, hid), (ffn, hid)]
    if name.endswith("linear_proj.weight"):
        return [(hid, q_rows)]
    if name.endswith("linear_fc2.weight"):
        return [(hid, ffn)]
    return [(hid,)]  # the norms


def to_megatron(
    rule: Rule, hf_tensors: Sequence[torch.Tensor], cfg: ModelConfig, padded_vocab: int
) -> torch.Tensor:
    """Combine the HF tensors of ``rule`` into the full (TP=1) Megatron tensor, checking every shape first."""
    for name, tensor, shape in zip(rule.hf, hf_tensors, expected_hf_shapes(rule, cfg)):
        if tuple(tensor.shape) != shape:
            raise ConversionError(
                f"{name} has shape {tuple(tensor.shape)}, but the config implies {shape} (hidden_size="
                f"{cfg.hidden_size}, ffn_hidden_size={cfg.ffn_hidden_size}, num_attention_heads="
                f"{cfg.num_attention_heads}, num_query_groups={cfg.num_query_groups}, vocab_size={cfg.vocab_size})"
            )
    if rule.kind == "qkv":
        q, k, v = hf_tensors
        return T.interleave_qkv(
            q, k, v, num_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups
        )
    if rule.kind == "gate_up":
        return T.fuse_gate_up(*hf_tensors)
    if rule.kind == "vocab":
        return T.pad_vocab(hf_tensors[0], padded_vocab)
    return hf_tensors[0]


def to_hf(rule: Rule, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """Split a full (TP-gathered) Megatron tensor into its HF ``(name, tensor)`` pairs (vocabulary unpadded)."""
    if rule.kind == "qkv":
        parts = T.split_qkv(tensor, num_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups)
    elif rule.kind == "gate_up":
        parts = T.split_gate_up(tensor)
    elif rule.kind == "vocab":
        parts = (T.unpad_vocab(tensor, cfg.vocab_size),)
    else:
        parts = (tensor,)
    out = list(zip(rule.hf, parts))
    for (name, part), shape in zip(out, expected_hf_shapes(rule, cfg)):
        if tuple(part.shape) != shape:
            raise ConversionError(
                f"Megatron tensor {rule.megatron} {tuple(tensor.shape)} gives {name} of shape {tuple(part.shape)}, "
                f"but the config implies {shape}"
            )
    return out


def megatron_name_candidates(name: str) -> tuple[str, ...]:
    """The local-spec name and, for the fused norms, its Transformer-Engine alias."""
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _TE_ALIASES:
        return name, f"decoder.layers.{match.group(1)}.{_TE_ALIASES[match.group(2)]}"
    return (name,)


def resolve_megatron_name(name: str, available: Container[str]) -> str:
    """The spelling of the local-spec ``name`` that ``available`` (a model's state-dict keys) uses."""
    for cand in megatron_name_candidates(name):
        if cand in available:
            return cand
    raise ConversionError(
        f"the Megatron model or checkpoint has no tensor {' or '.join(megatron_name_candidates(name))}"
    )


def checkpoint_key(rule: Rule, available: Container[str]) -> tuple[str, int | None]:
    """The ``dist_checkpointing`` key holding ``rule``'s tensor and, when layers are stacked under one key
    (``decoder.layers.<rest>`` with a leading layer axis, Megatron's default), the layer's index along it."""
    for cand in megatron_name_candidates(rule.megatron):
        if cand in available:
            return cand, None
        split = split_layer_name(cand)
        if split is not None and f"decoder.layers.{split[1]}" in available:
            return f"decoder.layers.{split[1]}", split[0]
    raise ConversionError(
        f"the Megatron checkpoint has no tensor for {rule.megatron} (looked for "
        f"{', '.join(megatron_name_candidates(rule.megatron))} and their stacked forms)"
    )


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``decoder.layers.{i}.rest`` -> ``(i, rest)``; None for tensors outside the layers."""
    match = _LAYER_RE.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


@dataclass(frozen=True)
class Architecture:
    """One supported HF model family: how its config.json maps to and from a ``ModelConfig``.

    ``hf_architectures``: the ``architectures`` entries of its config.json; ``model_type``: its ``model_type``.
    ``add_qkv_bias``: whether its Q/K/V projections carry a bias (what it cannot express, ``check_config`` rejects).
    ``check_config``: raises ``ConversionError`` on config.json features that cannot be converted (the
    ``ModelConfig`` itself is read by ``builders.model_config_from_hf``, which calls this check, as do the
    trainer and the conversion driver through it). ``write_config``: ``ModelConfig`` -> config.json dict (used
    when exporting without a source HF directory to copy it from).
    """

    name: str
    hf_architectures: tuple[str, ...]
    model_type: str
    add_qkv_bias: bool
    check_config: Callable[[dict[str, Any]], None]
    write_config: Callable[[ModelConfig], dict[str, Any]]

    def rules(self, cfg: ModelConfig, **kwargs: Any) -> list[Rule]:
        return decoder_rules(cfg, **kwargs)


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.name] = arch
    return arch


def _load_builtin() -> None:
    # Imported lazily: the architecture modules import this one.
    from megatron_opd.model.hf_conversion import llama, qwen2  # noqa: F401


def supported_architectures() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    """The architecture registered under ``name`` ('qwen2', 'llama')."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ConversionError(f"unknown architecture {name!r}; supported: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def architecture_for_hf_config(hf_config: dict[str, Any]) -> Architecture:
    """Pick the architecture from a config.json's ``architectures`` list or ``model_type``."""
    _load_builtin()
    declared = list(hf_config.get("architectures") or [])
    for arch in _REGISTRY.values():
        if (
            any(a in arch.hf_architectures for a in declared)
            or hf_config.get("model_type") == arch.model_type
        ):
            return arch
    supported = ", ".join(f"{a.name} ({'/'.join(a.hf_architectures)})" for a in _REGISTRY.values())
    raise ConversionError(
        f"unsupported model: architectures={declared}, model_type={hf_config.get('model_type')!r}; "
        f"supported: {supported}"
    )


def iter_rules_by_megatron(rules: Sequence[Rule]) -> Iterator[tuple[str, Rule]]:
    """``(name, rule)`` for every spelling (local and TE) of each rule's Megatron name."""
    for rule in rules:
        for cand in megatron_name_candidates(rule.megatron):
            yield cand, rule


def check_common_config(hf_config: dict[str, Any]) -> None:
    """Reject Llama-family features the Megatron model does not compute (``builders.model_config_from_hf`` reads
    the rest and rejects RoPE scaling and a head_dim other than hidden / heads)."""
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json has hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    if hf_config.get("mlp_bias"):
        raise ConversionError("config.json sets mlp_bias=true; MLP biases are not supported")


def common_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json keys every Llama-family model shares, from a ``ModelConfig``."""
    return {
        "num_hidden_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": head_dim(cfg),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "hidden_act": "silu",
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "torch_dtype": cfg.params_dtype,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
