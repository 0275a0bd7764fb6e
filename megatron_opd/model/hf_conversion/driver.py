"""Offline conversion between a Hugging Face directory and a Megatron ``torch_dist`` checkpoint.

Why it exists: users start from HF checkpoints and want HF checkpoints back. Both directions run in one process
and stream: HF tensors are read and written one at a time, never a second copy of the model.

- ``hf_to_megatron``: HF safetensors -> a TP=1/PP=1 Megatron model -> ``dist_checkpointing`` (torch_dist).
  Megatron saves the local and the Transformer-Engine layer spec under the same keys, and the format reshards
  on load, so the trainer loads the result at any TP/PP. The embedding and LM head are saved with Megatron's
  vocabulary padding and loaded with ``allow_shape_mismatch`` (zero rows), so another padding at another TP
  size loads too.
- ``megatron_to_hf``: any TP/PP ``torch_dist`` checkpoint (this tool's, or the ``dist/`` folder of a training
  checkpoint), read key by key without building a model -> safetensors shards, index, config.json, with the
  tokenizer and generation config copied from the source HF directory: ``transformers`` loads it as is. The
  embedding/LM head get back their HF row count (Qwen2: 151,936), dropping the padding.

Outputs are written into a hidden temporary directory next to the target and renamed into place only when
complete, so an interrupted conversion never leaves something that looks like a finished checkpoint.
The converted Megatron checkpoint carries ``megatron_opd_model.json`` (the ``ModelConfig`` and source) and the
source's config/tokenizer files under ``hf/``, so converting it back needs no other input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_opd.config.tree import ModelConfig, ParallelConfig
from megatron_opd.model.hf_conversion import architecture as A
from megatron_opd.model.hf_conversion import hf_files as F
from megatron_opd.model.hf_conversion import live
from megatron_opd.utils.errors import MissingFileError, OutputExistsError

logger = logging.getLogger(__name__)

METADATA_NAME = "megatron_opd_model.json"
HF_SUBDIR = "hf"
FORMAT = "megatron_opd.hf_conversion/1"


@contextlib.contextmanager
def single_process_megatron(seed: int = 1234) -> Iterator[None]:
    """Megatron's groups at TP=1/PP=1 in this process; starts (and afterwards ends) a 1-rank gloo/NCCL group
    unless one exists. Conversion is offline and runs in a single process."""
    from megatron_opd.parallel.state import destroy_parallel, initialize_parallel

    started = not dist.is_initialized()
    if not started and dist.get_world_size() != 1:
        raise RuntimeError(
            f"checkpoint conversion runs in one process, but torch.distributed has {dist.get_world_size()} ranks; "
            "run the conversion tool without torchrun"
        )
    initialize_parallel(ParallelConfig(), seed)
    try:
        yield
    finally:
        if started:
            destroy_parallel()


@contextlib.contextmanager
def _atomic_output(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` that becomes ``out_dir`` only if the block finishes."""
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"output {out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _progress(desc: str, enabled: bool):
    return lambda items: tqdm(items, desc=desc, unit="tensor", disable=not enabled)


def model_config_for_hf(
    hf_dir: str | os.PathLike[str], **overrides: Any
) -> tuple[A.Architecture, ModelConfig]:
    """The architecture and ``ModelConfig`` of a HF directory; rejects unsupported models with the reason."""
    from megatron_opd.model.builders import model_config_from_hf

    overrides = {k: v for k, v in overrides.items() if v is not None}
    # model_config_from_hf detects and checks the architecture: the trainer reads checkpoints the same way.
    cfg = model_config_from_hf(F.read_hf_config(hf_dir), hf_path=os.fspath(hf_dir), **overrides)
    return A.get_architecture(cfg.architecture), cfg


def hf_to_megatron(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    params_dtype: str | None = None,
    make_vocab_size_divisible_by: int | None = None,
    transformer_impl: str | None = None,
    target_tp: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ModelConfig:
    """Convert a HF checkpoint directory into a ``torch_dist`` Megatron checkpoint at ``out_dir``.

    Args:
        params_dtype: 'float32' / 'bfloat16' / 'float16'; default: the HF config's ``torch_dtype``.
        make_vocab_size_divisible_by: Megatron's vocabulary padding multiple (default of ``ModelConfig``).
        transformer_impl: the layer spec of the model built for saving ('auto', 'local', 'transformer_engine');
            both write the same checkpoint keys.
        target_tp: if given, fail now when that tensor-parallel size cannot split the model.
    Returns:
        the ``ModelConfig`` the checkpoint was written for.
    """
    from megatron.core import dist_checkpointing

    from megatron_opd.model.builders import build_model

    arch, cfg = model_config_for_hf(
        hf_dir,
        params_dtype=params_dtype,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        transformer_impl=transformer_impl,
    )
    if target_tp is not None:
        live.check_tensor_parallel(cfg, target_tp)
    reader = F.HFCheckpointReader(hf_dir)
    out = Path(out_dir)
    with single_process_megatron(), _atomic_output(out, overwrite) as tmp:
        model = build_model(cfg)
        used = live.load_hf_weights([model], reader, cfg, progress=_progress("hf -> megatron", progress))
        leftover = live.unused_hf_tensors(reader, used, cfg)
        if leftover:
            raise A.ConversionError(
                f"the HF checkpoint has {len(leftover)} tensors the config does not account for, e.g. "
                f"{leftover[:5]}; is config.json the one that belongs to these weights?"
            )
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))
        _write_metadata(tmp, cfg, arch, hf_dir)
    logger.info("wrote Megatron checkpoint %s (%s, %d layers)", out, arch.name, cfg.num_layers)
    return cfg


def _write_metadata(
    ckpt_dir: Path, cfg: ModelConfig, arch: A.Architecture, hf_dir: str | os.PathLike[str]
) -> None:
    meta = {
        "format": FORMAT,
        "architecture": arch.name,
        "source": os.fspath(hf_dir),
        "model": dataclasses.asdict(cfg),
    }
    (ckpt_dir / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    hf_copy = ckpt_dir / HF_SUBDIR
    hf_copy.mkdir()
    shutil.copy2(Path(hf_dir) / F.CONFIG_NAME, hf_copy / F.CONFIG_NAME)
    F.copy_auxiliary_files(hf_dir, hf_copy)


def read_metadata(ckpt_dir: str | os.PathLike[str]) -> ModelConfig | None:
    """The ``ModelConfig`` stored by ``hf_to_megatron`` in ``ckpt_dir`` (or its parent), None if there is none."""
    for d in (Path(ckpt_dir), Path(ckpt_dir).parent):
        path = d / METADATA_NAME
        if path.is_file():
            stored = json.loads(path.read_text())["model"]
            known = {f.name for f in dataclasses.fields(ModelConfig)}  # tolerate fields added/removed since
            return ModelConfig(**{k: v for k, v in stored.items() if k in known})
    return None


def _source_hf_dir(ckpt_dir: Path, hf_config_dir: str | os.PathLike[str] | None) -> Path | None:
    if hf_config_dir is not None:
        if not (Path(hf_config_dir) / F.CONFIG_NAME).is_file():
            raise MissingFileError(f"no {F.CONFIG_NAME} in {hf_config_dir} (the source HF directory)")
        return Path(hf_config_dir)
    for d in (ckpt_dir / HF_SUBDIR, ckpt_dir.parent / HF_SUBDIR):
        if (d / F.CONFIG_NAME).is_file():
            return d
    return None


def megatron_to_hf(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    hf_config_dir: str | os.PathLike[str] | None = None,
    model_cfg: ModelConfig | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Export a ``torch_dist`` Megatron checkpoint (any TP/PP it was saved at) as a HF model directory.

    Args:
        ckpt_dir: the checkpoint directory (the one holding ``metadata.json`` of dist_checkpointing).
        hf_config_dir: HF directory whose config.json, tokenizer and generation config are copied; default: the
            copy ``hf_to_megatron`` stored in the checkpoint. Without either, config.json is generated.
        model_cfg: the student's ``ModelConfig``; default: the one stored in the checkpoint, else read from
            ``hf_config_dir``.
        dtype: dtype of the written tensors; default ``model_cfg.params_dtype``.
        max_shard_bytes: the largest safetensors shard.
    Returns:
        the written safetensors file names.
    """
    from megatron_opd.model.builders import torch_dtype

    ckpt = Path(ckpt_dir)
    if not (ckpt / "metadata.json").is_file():
        raise MissingFileError(f"{ckpt} is not a dist_checkpointing checkpoint (no metadata.json)")
    source = _source_hf_dir(ckpt, hf_config_dir)
    if model_cfg is None:
        model_cfg = read_metadata(ckpt)
    if model_cfg is None:
        if source is None:
            raise MissingFileError(
                f"{ckpt} has no {METADATA_NAME}; pass the source HF directory (hf_config_dir / --hf-config-dir) "
                "or the ModelConfig"
            )
        _, model_cfg = model_config_for_hf(source)
    arch = A.get_architecture(model_cfg.architecture)
    out_dtype = torch_dtype(dtype or model_cfg.params_dtype)
    rules = A.decoder_rules(model_cfg)
    with single_process_megatron(), _atomic_output(Path(out_dir), overwrite) as tmp:
        writer = F.HFCheckpointWriter(tmp, max_shard_bytes=max_shard_bytes)
        for rule, tensor in iter_checkpoint_tensors(ckpt, rules, progress=progress):
            for name, part in A.to_hf(rule, tensor, model_cfg):
                writer.add(name, part.to(out_dtype))
        files = writer.finish()
        if source is not None:
            shutil.copy2(source / F.CONFIG_NAME, tmp / F.CONFIG_NAME)
            F.copy_auxiliary_files(source, tmp)
        else:
            (tmp / F.CONFIG_NAME).write_text(json.dumps(arch.write_config(model_cfg), indent=2) + "\n")
    logger.info("wrote HF checkpoint %s (%d shards, %.1f MB)", out_dir, len(files), writer.total_bytes / 1e6)
    return files


def iter_checkpoint_tensors(
    ckpt_dir: str | os.PathLike[str], rules: list[A.Rule], *, progress: bool = False
) -> Iterator[tuple[A.Rule, torch.Tensor]]:
    """The full (unsharded, padded) tensor of each rule, read from a ``torch_dist`` checkpoint group by group.

    No model is built: the checkpoint's own metadata gives each tensor's global shape and dtype, and
    dist_checkpointing assembles the full tensor from whatever TP/PP shards were saved. So this reads checkpoints
    of the local and the Transformer-Engine layer spec alike (the fused-norm names are resolved per key), with
    any vocabulary padding, and only the model's tensors (not the optimizer's). One checkpoint key is in memory at a
    time (for stacked layers: one parameter of every layer, a fraction of the model).
    (Megatron saves both specs under the TE names, stacking the layers: ``decoder.layers.mlp.linear_fc1.weight``
    has shape ``[num_layers, 2 ffn, hidden]``; ``architecture.checkpoint_key`` finds the key either way.)
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_opd.training import checkpoint_safety as safety

    metadata = safety.load_tensors_metadata(str(ckpt_dir))  # never runs code stored in the checkpoint
    by_key: dict[str, list[tuple[A.Rule, int | None]]] = {}
    for rule in rules:
        key, layer = A.checkpoint_key(rule, metadata)
        by_key.setdefault(key, []).append((rule, layer))
    bar = tqdm(total=len(rules), desc="megatron -> hf", unit="tensor", disable=not progress)
    for key, members in by_key.items():
        meta = metadata[key]
        request = {
            key: ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype))
        }
        full = safety.load_sharded(request, str(ckpt_dir))[key]
        for rule, layer in members:
            yield rule, (full if layer is None else full[layer])
            bar.update()
        del full
    bar.close()
