"""A manifest of every file in a checkpoint (size and CRC-32), written at save time and checked before a resume.

Why it exists: a checkpoint directory can be complete (renamed from ``.tmp``) and still damaged: a file cut short
by a full disk or a copy, a bit flipped on storage. Reading such a file fails deep inside torch or Megatron with
an ``EOFError`` or a zip error that names no file, and the run stops although the previous checkpoint is intact
(issue 16). With a manifest the trainer checks a checkpoint before trusting it and can fall back.

- Content: ``manifest.json`` in the iteration directory, ``{"format": 1, "algorithm": "crc32", "files":
  {"dist/__0_0.distcp": {"size": ..., "crc32": "0x..."}, ...}}``, every file below the directory except itself.
  It is written into ``iter_X.tmp`` after every other file and before the rename, so every complete checkpoint
  saved by this version has one.
- Cost: the hash is streamed (16 MiB reads) and the files are split over the ranks by size, so each rank reads
  about 1/world of the checkpoint once per save and once per resume. Sizes are compared first (a ``stat``), so a
  truncated file is found without reading anything. CRC-32 detects truncation and corruption, not tampering (an
  attacker who can write the files can rewrite the manifest; ``checkpoint_safety`` covers that).
- Checkpoints saved before manifests existed are accepted unverified (the caller logs a warning).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import torch.distributed as dist

from megatron_opd.parallel.collectives import collective_device

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 16 << 20


def file_crc32(path: str) -> str:
    """CRC-32 of a file's bytes, read in 16 MiB chunks (zlib releases the GIL while hashing)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"0x{crc:08x}"


def _list_files(directory: str) -> dict[str, int]:
    """Relative path -> size of every file below ``directory`` except the manifest, sorted by path."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, directory)
            if rel != MANIFEST_FILE:
                out[rel] = os.path.getsize(full)
    return dict(sorted(out.items()))


def _my_share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's files: largest first, each to the least-loaded rank (the same split on every rank)."""
    load = [0] * world
    mine = []
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += size
        if r == rank:
            mine.append(name)
    return mine


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a no-op without torch.distributed)."""
    rank, world = _rank_world()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def write_manifest(directory: str) -> None:
    """Hash every file of ``directory`` (split over the ranks) and write ``manifest.json`` atomically (rank 0).
    Collective when torch.distributed is initialized: every rank calls it after all files are written."""
    rank, world = _rank_world()
    sizes = broadcast_from_rank0(_list_files(directory) if rank == 0 else None)
    crcs = {name: file_crc32(os.path.join(directory, name)) for name in _my_share(sizes, rank, world)}
    merged: dict[str, str] = {}
    for part in _all_gather(crcs):
        merged.update(part)
    if rank == 0:
        manifest = {
            "format": MANIFEST_FORMAT,
            "algorithm": "crc32",
            "files": {name: {"size": size, "crc32": merged[name]} for name, size in sizes.items()},
        }
        path = os.path.join(directory, MANIFEST_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)


def _read_manifest(directory: str) -> tuple[dict[str, dict[str, Any]] | None, list[str]]:
    """(files, problems): files None without a manifest; a problem when it is unreadable."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(path):
        return None, []
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("algorithm") != "crc32":
            return {}, [f"{path}: unknown manifest format {manifest.get('format')!r}"]
        return {str(k): {"size": int(v["size"]), "crc32": str(v["crc32"])} for k, v in files.items()}, []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return {}, [f"{path}: unreadable ({type(e).__name__}: {e})"]


def verify_checkpoint(directory: str) -> list[str] | None:
    """Check ``directory`` against its manifest: the list of problems (each naming a file: missing, wrong size,
    wrong checksum), empty when intact, None when it has no manifest (saved before manifests existed).
    Collective when torch.distributed is initialized; every rank gets the same answer."""
    rank, world = _rank_world()
    if rank == 0:
        files, problems = _read_manifest(directory)
        if files:
            for name, entry in files.items():
                full = os.path.join(directory, name)
                if not os.path.isfile(full):
                    problems.append(f"{full}: missing")
                elif (size := os.path.getsize(full)) != entry["size"]:
                    problems.append(
                        f"{full}: {size} bytes, the manifest says {entry['size']} (truncated or cut)"
                    )
        verdict = (files, problems)
    else:
        verdict = None
    files, problems = broadcast_from_rank0(verdict)
    if files is None or problems:
        return None if files is None else problems
    sizes = {name: entry["size"] for name, entry in files.items()}
    mine = []
    for name in _my_share(sizes, rank, world):
        full = os.path.join(directory, name)
        if (crc := file_crc32(full)) != files[name]["crc32"]:
            mine.append(f"{full}: checksum {crc}, the manifest says {files[name]['crc32']} (corrupt)")
    return sorted(p for part in _all_gather(mine) for p in part)
