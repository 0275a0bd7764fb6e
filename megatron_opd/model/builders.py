"""Build the student as a Megatron-core ``GPTModel`` (Qwen2 and Llama families) from ``ModelConfig``.

Why it exists: one place turns the architecture fields into Megatron's ``TransformerConfig`` and layer spec, so
the trainer, the conversion tools and the tests build exactly the same model. Qwen2 and Llama share the recipe
(RMSNorm, SwiGLU, RoPE with the model's base, GQA); they differ in the QKV bias and whether the LM head is tied.

Layer spec: Transformer-Engine's when ``transformer_engine`` imports (GPU; FP8 possible) and Megatron's local
spec otherwise; the choice is logged. With the local spec the state-dict keys are Megatron's standard ones
(``embedding.word_embeddings.weight``, ``decoder.layers.{i}.self_attention.linear_qkv.weight``,
``decoder.layers.{i}.input_layernorm.weight``, ``decoder.layers.{i}.mlp.linear_fc1.weight``, ...,
``decoder.final_layernorm.weight``, ``output_layer.weight``); the TE spec fuses the pre-attention/pre-MLP norms
into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``.

The embedding is padded to a multiple of ``make_vocab_size_divisible_by * TP`` rows (Megatron's rule); the
trainer masks the padding ids out of the softmax so logprobs match the unpadded HF model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_opd.config.base import ConfigError
from megatron_opd.config.tree import ModelConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' -> the torch dtype."""
    return _DTYPES[name]


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Embedding rows after Megatron's padding: the next multiple of ``divisible_by * tp_size``."""
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_engine_available() -> bool:
    """Whether Transformer-Engine imports (and CUDA is present, which its layers need)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # any import failure means we cannot use it
        return False
    return True


# Megatron's fused softmax (masked_softmax_fusion) imports these extensions at its first call; they are built by
# apex or shipped in NGC images, not in megatron-core's wheel.
_SOFTMAX_KERNELS = (
    "scaled_upper_triang_masked_softmax_cuda",
    "scaled_masked_softmax_cuda",
    "scaled_softmax_cuda",
)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def masked_softmax_fusion_available() -> bool:
    """Whether Megatron's ``masked_softmax_fusion`` can run: CUDA is present and its softmax kernels import."""
    return torch.cuda.is_available() and all(_importable(m) for m in _SOFTMAX_KERNELS)


def use_sdpa_attention(model_cfg: ModelConfig) -> bool:
    """Resolve ``model.local_attention`` for the local spec: 'auto' and 'sdpa' are torch SDPA."""
    return model_cfg.local_attention != "megatron"


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    """Resolve ``model.transformer_impl``: 'auto' picks TE when it is usable."""
    if model_cfg.transformer_impl == "local":
        return False
    available = transformer_engine_available()
    if model_cfg.transformer_impl == "transformer_engine" and not available:
        raise RuntimeError(
            "model.transformer_impl is 'transformer_engine' but transformer_engine does not import (or CUDA is "
            "absent); install transformer-engine[pytorch] on a GPU machine or set model.transformer_impl=local"
        )
    return available


def transformer_config(
    model_cfg: ModelConfig, *, sequence_parallel: bool = False, use_te: bool | None = None
) -> TransformerConfig:
    """Megatron's ``TransformerConfig`` for the student; parallel sizes come from the initialised groups."""
    if use_te is None:
        use_te = use_transformer_engine(model_cfg)
    if model_cfg.fp8 is not None and not use_te:
        raise RuntimeError(
            "model.fp8 needs Transformer-Engine layers (GPU with transformer_engine installed)"
        )
    dtype = torch_dtype(model_cfg.params_dtype)
    cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    if model_cfg.recompute_activations:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if model_cfg.fp8 is not None:
        kwargs.update(fp8=model_cfg.fp8, fp8_recipe="delayed")
    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    return TransformerConfig(
        # Megatron's default ("full") is its deprecated spelling of "no CUDA graphs": it warns in every process.
        cuda_graph_scope=[],
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.hidden_size // model_cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=mpu.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=mpu.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=mpu.get_context_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        # Responses differ in length from batch to batch (truncated horizons): shapes are exchanged per step.
        variable_seq_lengths=True,
        # Batched p2p over gloo mismatches a forward activation and a backward gradient sent to the same peer at
        # once (PP=2 with the interleaved schedule gave wrong activations); unbatched sends keep their order.
        batch_p2p_comm=not cpu,
        # variable_seq_lengths passes Megatron's config check only with this dispatcher (no MoE is used).
        moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=cpu,
        # Fusions that need CUDA kernels (apex, TE) are off on CPU and where the kernel is missing; the other two
        # are TorchScript fusions that any CUDA torch runs.
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=masked_softmax_fusion_available(),
        bias_activation_fusion=not cpu,
        bias_dropout_fusion=not cpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **kwargs,
    )


def layer_spec(model_cfg: ModelConfig, use_te: bool | None = None) -> ModuleSpec:
    """The transformer-layer spec: TE when usable (see ``use_transformer_engine``), else Megatron's local one."""
    if use_te is None:
        use_te = use_transformer_engine(model_cfg)
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        logger.info("layer spec: Transformer-Engine")
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if use_sdpa_attention(model_cfg):
        from megatron_opd.model.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    attention = "torch SDPA" if use_sdpa_attention(model_cfg) else "Megatron DotProductAttention"
    logger.info("layer spec: Megatron local (transformer_engine not used), attention: %s", attention)
    return spec


def build_model(
    model_cfg: ModelConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    sequence_parallel: bool = False,
) -> GPTModel:
    """One model chunk (this rank's layers) of the student. Needs ``initialize_parallel`` to have run.

    The output is vocab-parallel: logits [B, S, V_padded / TP] when called without labels.
    """
    use_te = use_transformer_engine(model_cfg)
    if sequence_parallel and not use_te:
        try:
            import apex  # noqa: F401  (the local spec's norm supports sequence parallelism only through apex)
        except ImportError:
            raise RuntimeError(
                "parallel.sequence_parallel needs Transformer-Engine layers (or apex): Megatron's local spec falls "
                "back to torch norms, which do not support it; disable sequence_parallel on this machine"
            ) from None
    config = transformer_config(model_cfg, sequence_parallel=sequence_parallel, use_te=use_te)
    vocab = padded_vocab_size(
        model_cfg.vocab_size,
        model_cfg.make_vocab_size_divisible_by,
        mpu.get_tensor_model_parallel_world_size(),
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model_cfg, use_te),
        vocab_size=vocab,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(model_cfg.rotary_base),
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def build_model_chunks(model_cfg: ModelConfig, *, sequence_parallel: bool = False) -> list[GPTModel]:
    """This rank's model chunks: one, or one per virtual pipeline stage with the interleaved schedule."""
    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None or vpp == 1:
        return [
            build_model(
                model_cfg,
                pre_process=mpu.is_pipeline_first_stage(),
                post_process=mpu.is_pipeline_last_stage(),
                sequence_parallel=sequence_parallel,
            )
        ]
    chunks = []
    for stage in range(vpp):
        chunks.append(
            build_model(
                model_cfg,
                pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
                sequence_parallel=sequence_parallel,
            )
        )
    return chunks


@contextlib.contextmanager
def hidden_states_only(core: torch.nn.Module) -> Iterator[None]:
    """Make a last-stage ``GPTModel`` return its final (normed) hidden states [S, B, H] instead of logits."""
    core.post_process = False
    try:
        yield
    finally:
        core.post_process = True


def lm_head_weight(core: torch.nn.Module) -> torch.Tensor:
    """The last stage's LM-head weight shard [V_padded / TP, H] (the tied embedding where the head is tied)."""
    if core.share_embeddings_and_output_weights:
        return core.shared_embedding_or_output_weight()
    return core.output_layer.weight


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE base from a config.json, old style (``rope_theta``) or transformers-5 style (``rope_parameters``)."""
    from megatron_opd.model.hf_conversion.architecture import ConversionError

    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConversionError(
            f"RoPE scaling type {kind!r} is not supported by megatron_opd's builders (only plain RoPE)"
        )
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def model_config_from_hf(path_or_config: str | os.PathLike | dict[str, Any], **overrides: Any) -> ModelConfig:
    """Read a Hugging Face ``config.json`` (a model directory, the file, or its dict) into a ``ModelConfig``.

    The architecture is detected and checked by the conversion registry (``hf_conversion.architecture``): the
    trainer, the teacher and the conversion driver all read a checkpoint through here. ``overrides`` replace
    fields afterwards (e.g. ``params_dtype='bfloat16'``). A model it cannot build raises ``ConversionError``.
    """
    # Not at the top: an import cycle.
    from megatron_opd.model.hf_conversion.architecture import ConversionError, architecture_for_hf_config

    if isinstance(path_or_config, dict):
        hf, hf_path = path_or_config, None
    else:
        path = os.fspath(path_or_config)
        hf_path = path if os.path.isdir(path) else os.path.dirname(path)
        cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(cfg_file, encoding="utf-8") as f:
            hf = json.load(f)
    arch = architecture_for_hf_config(hf)
    arch.check_config(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hf["hidden_size"]:
        raise ConversionError(
            f"head_dim {head_dim} x heads {heads} != hidden_size {hf['hidden_size']}: not supported"
        )
    dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    fields: dict[str, Any] = dict(
        hf_path=hf_path,
        architecture=arch.name,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rotary_base=_rope_theta(hf),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        add_qkv_bias=arch.add_qkv_bias,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        params_dtype=dtype if dtype in _DTYPES else "float32",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


# What a run's model section may only repeat when it reads the student from model.hf_path; the rest of the
# section (dtype, FP8, layer spec, recomputation, vocabulary padding) says how the checkpoint is run.
ARCHITECTURE_FIELDS = (
    "architecture",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "max_position_embeddings",
    "rotary_base",
    "norm_epsilon",
    "add_qkv_bias",
    "untie_embeddings_and_output_weights",
)


def student_model_config(model: ModelConfig) -> ModelConfig:
    """The student's ``ModelConfig`` for a run: the architecture from ``model.hf_path``'s config.json, the runtime
    fields from ``model``.

    An architecture field of ``model`` that was given (differs from its dataclass default) and disagrees with
    the checkpoint raises ``ConfigError`` naming the key and both values: the weights fix the architecture, and
    a value that is silently ignored would lie. (A field given with exactly its default value cannot be told
    from one left out; it is then read from the checkpoint like any other.)
    """
    if model.hf_path is None:
        raise ConfigError(
            "config key 'model.hf_path': a run needs the student's HF directory (weights + tokenizer)"
        )
    runtime = {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ARCHITECTURE_FIELDS and f.name != "hf_path"
    }
    from_ckpt = model_config_from_hf(model.hf_path, **runtime)
    defaults = ModelConfig()
    for key in ARCHITECTURE_FIELDS:
        given, stored = getattr(model, key), getattr(from_ckpt, key)
        if given != getattr(defaults, key) and given != stored:
            raise ConfigError(
                f"config key 'model.{key}': got {given!r}, but the checkpoint model.hf_path ({model.hf_path}) has "
                f"{stored!r} in its config.json; the architecture comes from the checkpoint: remove the key or "
                f"set it to {stored!r}"
            )
    return from_ckpt
