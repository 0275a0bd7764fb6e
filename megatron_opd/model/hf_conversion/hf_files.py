"""Reading and writing Hugging Face checkpoint directories, one tensor at a time.

Why it exists: a converted model must never be held twice in memory. ``HFCheckpointReader`` opens safetensors files
lazily (memory-mapped, sharded with ``model.safetensors.index.json`` or a single ``model.safetensors``) and hands out
one tensor per call; ``HFCheckpointWriter`` collects tensors into shards of bounded size, writes each shard as soon
as it is full, and writes the index last. Both fail with the path of whatever is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_opd.model.hf_conversion.architecture import ConversionError
from megatron_opd.utils.errors import MissingFileError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Files copied alongside the weights so the exported directory is a complete HF model.
AUXILIARY_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json of ``hf_dir`` as a dict."""
    path = Path(hf_dir) / CONFIG_NAME
    if not path.is_file():
        raise MissingFileError(f"no {CONFIG_NAME} in {hf_dir} (expected a Hugging Face model directory)")
    return _read_json(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); restore it from the model's source") from e


# What reading a truncated or corrupt safetensors file raises (safetensors' own error or the OS's).
SAFETENSORS_READ_ERRORS = (SafetensorError, OSError)


def corrupt_safetensors(path: str | os.PathLike[str], error: BaseException) -> ConversionError:
    """The error for a safetensors file that cannot be read: names the file and what to do."""
    return ConversionError(
        f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); the file is truncated or "
        "corrupt: download or convert it again"
    )


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)``; a truncated or corrupt file raises ``ConversionError`` naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SAFETENSORS_READ_ERRORS as e:
        raise corrupt_safetensors(path, e) from e


class HFCheckpointReader:
    """Lazy access to the tensors of a HF safetensors checkpoint: ``names()``, ``get(name)``, ``pop(name)``."""

    def __init__(self, hf_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise MissingFileError(f"Hugging Face checkpoint directory {self.dir} does not exist")
        index = self.dir / INDEX_NAME
        if index.is_file():
            weight_map: dict[str, str] = _read_json(index)["weight_map"]
        elif (self.dir / SINGLE_NAME).is_file():
            with open_safetensors(self.dir / SINGLE_NAME) as f:
                weight_map = {name: SINGLE_NAME for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        else:
            raise MissingFileError(
                f"no {INDEX_NAME} or {SINGLE_NAME} in {self.dir} (only safetensors checkpoints are supported)"
            )
        for shard in sorted(set(weight_map.values())):
            if not (self.dir / shard).is_file():
                raise MissingFileError(
                    f"{INDEX_NAME} in {self.dir} names the shard {shard}, which is missing"
                )
        self._weight_map = weight_map

    def names(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its (memory-mapped) shard."""
        if name not in self._weight_map:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.dir}")
        # Opened per tensor (the header parse is cheap): a handle kept open keeps the shard's pages mapped, and
        # the resident size would grow to a second copy of the model over a conversion.
        with open_safetensors(self.dir / self._weight_map[name]) as f:
            return f.get_tensor(name)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HFCheckpointWriter:
    """Streams ``(name, tensor)`` pairs into ``model-XXXXX-of-YYYYY.safetensors`` shards plus the index.

    A shard is written once it would exceed ``max_shard_bytes``, so at most one shard is buffered. Call
    ``finish()`` to write the last shard, rename the shards with the final count and write the index.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, max_shard_bytes: int = 5 * 2**30) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = _nbytes(tensor)
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        # safetensors needs contiguous tensors that own their storage (no views sharing memory).
        self._buffer[name] = tensor.detach().to("cpu").contiguous().clone()
        self._buffer_bytes += size
        self.total_bytes += size

    def add_all(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in pairs:
            self.add(name, tensor)

    def _flush(self) -> None:
        if not self._buffer:
            return
        save_file(self._buffer, self.dir / f"shard-{len(self._shards):05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is left and the index; returns the shard file names."""
        self._flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        files = []
        for i, names in enumerate(self._shards):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files


def copy_auxiliary_files(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str]) -> list[str]:
    """Copy the tokenizer files and generation_config.json that exist in ``src_dir``; returns their names."""
    copied = []
    for name in AUXILIARY_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(dst_dir) / name)
            copied.append(name)
    return copied
