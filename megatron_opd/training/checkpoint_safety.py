"""Read checkpoint files without ever running code stored in them.

Why it exists: a checkpoint directory may come from anywhere (a shared disk, a download), and pickle runs
whatever a file tells it to. ``torch.load(weights_only=True)`` covers the files this project reads itself, but
``megatron.core.dist_checkpointing`` reaches three readers that do not: torch DCP's ``FileSystemReader``
unpickles ``.metadata`` with plain ``pickle.load``, DCP's default planner loads the byte items in ``*.distcp``
(Megatron's ``ShardedObject``s, e.g. ``_extra_state``) with ``weights_only=False``, and Megatron's common
strategy loads ``common.pt`` with torch's default (``weights_only`` only by default, and an environment variable
turns that off). This module gives ``dist_checkpointing`` a load strategy that reads ``.metadata`` with a
restricted unpickler (an allow-list of DCP's metadata classes, ``torch.Size`` and dtypes; anything else is
refused before it is called), loads byte items and ``common.pt`` with ``weights_only=True``, and turns every
refusal into a ``CheckpointError`` naming the file.

Every checkpoint read in the package goes through ``load_sharded``, ``load_tensors_metadata`` and
``load_torch_file`` (training resume, ``tools/eval.py --megatron-ckpt``, ``tools/convert_megatron_to_hf.py``).
The load body of ``TorchDistLoadShardedStrategy`` is repeated here (megatron-core 0.16.1) because it builds its
reader and planner inside; only those two objects differ.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_opd.utils.errors import OPDError


class CheckpointError(OPDError, RuntimeError):
    """A checkpoint cannot be written or resumed as asked (the message says why and what to do)."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_md
    import torch.distributed.checkpoint.planner as dcp_pl

    allowed: dict[tuple[str, str], Any] = {("torch", "Size"): torch.Size}
    # Plain data classes and enums: constructing them runs no user code.
    for module, names in (
        (
            dcp_md,
            (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            ),
        ),
        (dcp_pl, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType")),
        (dcp_fs, ("_StorageInfo",)),
    ):
        for name in names:
            if hasattr(module, name):
                allowed[(module.__name__, name)] = getattr(module, name)
    # torch.serialization._get_layout maps a layout's name to the layout object (a dictionary lookup).
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in dir(torch):  # dtypes, layouts and memory formats are constants, not callables that run code
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = obj
    for cls in (PurePosixPath, PosixPath):  # a checkpoint id may be stored as a path
        allowed[(cls.__module__, cls.__name__)] = cls
    allowed[("collections", "OrderedDict")] = OrderedDict
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals (the documented way to restrict pickle):
    with no other callable reachable, unpickling can only build DCP metadata."""

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global '{module}.{name}' (not a torch.distributed.checkpoint metadata type)"
            ) from None


def read_dcp_metadata(path: str | os.PathLike[str]) -> Metadata:
    """Unpickle a DCP ``.metadata`` file with the restricted unpickler; ``CheckpointError`` naming it if the file
    is not plain DCP metadata (crafted, truncated or another format)."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing (not a complete torch_dist checkpoint)") from e
    except Exception as e:
        raise CheckpointError(
            f"{path}: not loadable as checkpoint metadata ({type(e).__name__}: {e}); the file is corrupt or was "
            "not written by torch.distributed.checkpoint, and was not executed"
        ) from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            f"{path}: holds a {type(metadata).__name__}, not torch.distributed.checkpoint metadata"
        )
    return metadata


def load_torch_file(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``; any failure (a refused global, a truncated or corrupt file)
    becomes a ``CheckpointError`` naming the file."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except Exception as e:
        raise CheckpointError(
            f"{path}: not loadable with torch.load(weights_only=True) ({type(e).__name__}: {e}); the file is "
            "corrupt or holds objects other than tensors and plain types, and was not executed"
        ) from e


class _SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with the restricted metadata unpickler (cached: Megatron reads it twice per load) and
    read errors that name the files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if self._metadata is None or rank is not None:
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            metadata = read_dcp_metadata(os.path.join(os.fspath(self.path), name))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if rank is not None:
                return metadata
            self._metadata = metadata
        return self._metadata

    def _slice_file(self, file: Any, sinfo: Any) -> Any:
        self._reading = sinfo.relative_path  # the file of the item being read, for the error message
        return super()._slice_file(file, sinfo)

    def read_data(self, plan: Any, planner: Any) -> Any:
        self._reading: str | None = None
        try:
            return super().read_data(plan, planner)
        except CheckpointError:
            raise
        except Exception as e:
            files = self._reading or ", ".join(
                sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
            )
            raise CheckpointError(
                f"{os.path.join(os.fspath(self.path), files)}: reading a tensor failed ({type(e).__name__}: {e}); "
                "the file is corrupt or holds objects other than tensors, and was not executed"
            ) from e


class _SafeLoadPlanner(mcore_torch.MCoreLoadPlanner):
    """Megatron's planner, with byte items (``ShardedObject``s) loaded by ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            info = (self.metadata.storage_data or {}).get(read_item.storage_index)
            where = getattr(info, "relative_path", "a .distcp file")
            raise CheckpointError(
                f"{where}: the stored object '{read_item.dest_index.fqn}' is not loadable with "
                f"torch.load(weights_only=True) ({type(e).__name__}: {e}); it was not executed"
            ) from e
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` read with ``weights_only=True``, named in every error."""

    def load_common(self, checkpoint_dir: str | Path) -> Any:
        return load_torch_file(os.path.join(checkpoint_dir, COMMON_STATE_FNAME), map_location="cpu")

    def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: str | Path) -> None:
        # torch_dist keeps ShardedObjects inside its .distcp files (can_handle_sharded_objects), so Megatron never
        # asks the common strategy for per-object files; refuse rather than read them unchecked.
        raise CheckpointError(
            f"{checkpoint_dir}: per-object .pt files are not read (only torch_dist checkpoints are supported)"
        )


class _SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """``TorchDistLoadShardedStrategy`` with the safe reader and planner (body as in megatron-core 0.16.1)."""

    def load(self, sharded_state_dict: Any, checkpoint_dir: Path) -> Any:
        flexible_shape = [
            t
            for t in nested_values(sharded_state_dict)
            if isinstance(t, ShardedTensor) and not t.allow_shape_mismatch
        ]
        mismatch_ok = {
            t.key: t
            for t in nested_values(sharded_state_dict)
            if isinstance(t, ShardedTensor) and t.allow_shape_mismatch
        }
        orig = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = (
            mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
        )
        pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, True)
        reader = _SafeFileSystemReader(checkpoint_dir)
        dcp.load_state_dict(
            pyt_state_dict,
            reader,
            planner=_SafeLoadPlanner(
                shapes_validation_sharded_tensors=flexible_shape,
                allow_shape_mismatch_sharded_tensors=mismatch_ok,
            ),
        )
        self.cached_global_metadata = reader.read_metadata()
        mcore_state_dict = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        mcore_state_dict = mcore_torch._replace_sharded_keys_with_state_dict_keys(
            mcore_state_dict, flat_mapping, rename_mapping
        )
        mcore_torch._restore_dict_types(mcore_state_dict, orig)
        return mcore_state_dict

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Metadata | None = None) -> Any:
        if metadata is None:
            metadata = _SafeFileSystemReader(checkpoint_dir).read_metadata()
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir: Path) -> Any:
        raise CheckpointError(f"{checkpoint_dir}: sharded-object metadata is not read by this project")


def _unwrap(e: BaseException) -> CheckpointError | None:
    """The ``CheckpointError`` raised on any rank inside a DCP collective (DCP re-raises rank failures wrapped
    in a ``CheckpointException``)."""
    if isinstance(e, CheckpointError):
        return e
    if isinstance(e, CheckpointException):
        for inner, _trace in e.failures.values():
            if isinstance(inner, CheckpointError):
                return inner
    return None


def load_sharded(sharded_state_dict: dict[str, Any], checkpoint_dir: str) -> dict[str, Any]:
    """``dist_checkpointing.load`` with the safe strategies (collective: every rank calls it)."""
    try:
        return dist_checkpointing.load(
            sharded_state_dict,
            checkpoint_dir,
            sharded_strategy=_SafeTorchDistLoadStrategy(),
            common_strategy=_SafeCommonLoadStrategy(),
        )
    except CheckpointingException as e:
        raise CheckpointError(f"{checkpoint_dir}: {e}") from e
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        inner = _unwrap(e)
        if inner is None:
            raise
        raise CheckpointError(str(inner)) from e


def load_tensors_metadata(checkpoint_dir: str) -> dict[str, Any]:
    """``dist_checkpointing.load_tensors_metadata`` with the restricted metadata unpickler: key -> a
    ``ShardedTensor`` without data carrying the global shape and dtype."""
    try:
        return dist_checkpointing.load_tensors_metadata(
            checkpoint_dir, sharded_strategy=_SafeTorchDistLoadStrategy()
        )
    except CheckpointingException as e:
        raise CheckpointError(f"{checkpoint_dir}: {e}") from e
