"""Start-up checks that need the file system or the model's config.json, run before any model is built.

Why it exists: the config tree validates values on their own, but some mistakes only show against the disk: a
model directory that does not exist, a TP size that does not divide the checkpoint's attention heads, a save
folder that cannot be written. Found late, they cost every step before the first save, or surface as a Megatron
assertion from every rank. Here each is a ``ConfigError`` naming the key, the numbers and the fix, before the
process group does any work.
"""

from __future__ import annotations

import os
import tempfile

from megatron_opd.config.base import ConfigError
from megatron_opd.config.tree import ModelConfig, OPDConfig, ParallelConfig
from megatron_opd.model.builders import student_model_config


def check_run_inputs(cfg: OPDConfig) -> None:
    """Every check of this module for a training run (the student's and teacher's directories, the student's
    layout against TP/PP, the output folders)."""
    check_hf_dir("model.hf_path", cfg.model.hf_path)
    if cfg.teacher.hf_path is not None:
        check_hf_dir("teacher.hf_path", cfg.teacher.hf_path)
    check_layout(
        student_model_config(cfg.model), cfg.parallel
    )  # also rejects contradicting architecture keys
    for key, path in (("checkpoint.save", cfg.checkpoint.save), ("logging.log_dir", cfg.logging.log_dir)):
        if path:
            check_writable_dir(key, path)


def check_hf_dir(key: str, path: str | None) -> None:
    """``path`` (the value of config key ``key``) is a Hugging Face model directory with a config.json."""
    if path is None:
        raise ConfigError(
            f"config key '{key}': not set; a run needs the HF model directory (weights + tokenizer)"
        )
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise ConfigError(f"config key '{key}': {path} {what}; give the Hugging Face model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(
            f"config key '{key}': {path} has no config.json; give a Hugging Face model directory "
            "(config.json, tokenizer, *.safetensors)"
        )


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """The tensor-parallel size divides the attention heads, the query (KV) groups and the MLP width; the
    pipeline size (times the virtual stages) divides the layers. ``model`` is read from ``model.hf_path``."""
    tp = parallel.tensor_model_parallel_size
    source = f"the config.json of model.hf_path ({model.hf_path})"
    for name, value in (
        ("num_attention_heads", model.num_attention_heads),
        ("num_key_value_heads", model.num_query_groups),
        ("intermediate_size", model.ffn_hidden_size),
    ):
        if value % tp:
            raise ConfigError(
                f"config key 'parallel.tensor_model_parallel_size': got {tp}, which does not divide {name} = "
                f"{value} of {source}; allowed: a divisor of {value} ({_divisors(value)})"
            )
    pp, vpp = parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size or 1
    if model.num_layers % (pp * vpp):
        key = "parallel.pipeline_model_parallel_size"
        what = f"got {pp}"
        if vpp > 1:
            key += "' x 'parallel.virtual_pipeline_model_parallel_size"
            what = f"got {pp} x {vpp} = {pp * vpp}"
        raise ConfigError(
            f"config key '{key}': {what}, which does not divide num_hidden_layers = {model.num_layers} of "
            f"{source}; allowed: a divisor of {model.num_layers} ({_divisors(model.num_layers)})"
        )


def check_writable_dir(key: str, path: str) -> None:
    """``path`` (config key ``key``) exists or can be created, and a file can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
            pass
    except FileExistsError:
        raise ConfigError(
            f"config key '{key}': {path} is a file, not a directory; choose another path"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"config key '{key}': {path} is not a writable directory ({type(e).__name__}: {e.strerror or e}); "
            "choose a path this user can write"
        ) from None
