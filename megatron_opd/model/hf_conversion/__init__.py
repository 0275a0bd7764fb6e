"""Hugging Face <-> Megatron weight conversion (Qwen2, Llama): offline checkpoints and live weight sync.

Layout: ``tensors.py`` (QKV interleave, gate/up fusion, vocabulary padding, TP shard merge/split),
``architecture.py`` (the name/shape rules of a Llama-family decoder, the registry), ``qwen2.py`` / ``llama.py``
(their config.json specifics), ``hf_files.py`` (streaming safetensors read/write), ``live.py`` (HF-named tensors
to/from the live sharded model), ``driver.py`` (the two offline conversions).
"""

from megatron_opd.model.hf_conversion.architecture import (
    ConversionError,
    architecture_for_hf_config,
    get_architecture,
    supported_architectures,
)
from megatron_opd.model.hf_conversion.driver import hf_to_megatron, megatron_to_hf
from megatron_opd.model.hf_conversion.live import iter_hf_weight_buckets, iter_hf_weights, load_hf_weights

__all__ = [
    "ConversionError",
    "architecture_for_hf_config",
    "get_architecture",
    "hf_to_megatron",
    "iter_hf_weight_buckets",
    "iter_hf_weights",
    "load_hf_weights",
    "megatron_to_hf",
    "supported_architectures",
]
