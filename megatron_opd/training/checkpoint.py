"""Save and resume a run: model and optimizer through ``megatron.core.dist_checkpointing``, plus trainer state.

Why it exists: an OPD run must survive preemption and resume bit-for-bit (same losses after resume), and a
checkpoint must be loadable into another TP/PP layout (train at TP=2, evaluate at TP=1). Megatron's
``dist_checkpointing`` (torch_dist format) stores every tensor by its global name and shard, which gives the
re-layout; this module adds what a trainer needs around it:

- Atomicity. A checkpoint is written into ``iter_XXXXXXX.tmp``, a manifest of every file's size and CRC-32 is
  added last (``checkpoint_manifest.py``), every file is fsynced, then the directory is renamed to
  ``iter_XXXXXXX`` and only then ``latest_checkpointed_iteration.txt`` is replaced (write, fsync, rename). A
  crash at any point leaves the previous checkpoint as the latest; ``*.tmp`` leftovers are never read and are
  removed by the next save.
- Verification and fallback. Before a resume reads anything, the chosen checkpoint is checked against its
  manifest; a damaged one (a file missing, cut short or changed) is skipped with a warning naming the file, and
  the newest intact older one is loaded; when none is intact the error names every damaged file. Checkpoints
  saved before manifests existed load unverified, with a warning.
- Safety. Every file is read without running code stored in it (``checkpoint_safety.py``: restricted unpickler
  for DCP's ``.metadata``, ``weights_only=True`` everywhere else).
- A full disk during a save raises a ``CheckpointError`` saying so, with the directory and its free bytes; the
  half-written ``.tmp`` is removed and the previous checkpoint stays the latest.
- Retention: after a save completes, all but the newest ``keep_last`` checkpoints are deleted.
- Trainer state: a plain-types dict from the caller (step, consumed prompts, data order, the horizon
  schedule's ``state_dict`` ...) plus the LR scheduler, saved with ``torch.save`` and loaded with
  ``weights_only=True``; the save fails at once if it holds anything else. RNG states are saved per rank and
  restored when the layout (world size, TP, PP) is unchanged.
- Optimizer. The regular optimizer's state is stored in model space and re-shards with the model. The
  distributed optimizer's own formats did not round-trip on megatron-core 0.16.1, so its state is gathered
  here into the same model-space form (one fp32 tensor per parameter and state, as the regular optimizer
  stores it; ``distopt_checkpoint.py``) and scattered back to each rank's shard on load, so it re-shards over
  TP, PP and DP too. Resume with the same kind of optimizer it was saved with (the non-tensor part differs
  between the two). A checkpoint saved without optimizer state cannot be resumed with
  ``load_optimizer=True``: that fails loudly instead of silently resetting Adam.
- Vocabulary padding may differ between layouts (Megatron pads to a multiple of divisible_by x TP): the
  embedding and LM-head tensors are loaded with Megatron's shape-mismatch allowance.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as mpu
from megatron.core.optimizer.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from megatron_opd.parallel.collectives import collective_device
from megatron_opd.training import checkpoint_safety as safety
from megatron_opd.training.checkpoint_manifest import broadcast_from_rank0, verify_checkpoint, write_manifest
from megatron_opd.training.checkpoint_safety import CheckpointError

logger = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
TRAINER_STATE_FILE = "trainer_state.pt"
FORMAT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: str, iteration: int) -> str:
    """``root/iter_XXXXXXX``."""
    return os.path.join(root, f"iter_{iteration:07d}")


def complete_iterations(root: str) -> list[int]:
    """Iterations with a complete (renamed) checkpoint directory, ascending."""
    if not os.path.isdir(root):
        return []
    found = [int(m.group(1)) for name in os.listdir(root) if (m := _ITER_RE.match(name))]
    return sorted(i for i in found if os.path.isdir(iteration_dir(root, i)))


def latest_iteration(root: str) -> int | None:
    """The newest complete checkpoint: the marker file's value when it names a complete checkpoint, else the
    newest complete directory (a marker lost in a crash does not lose the run). None when there is none."""
    complete = complete_iterations(root)
    marker = os.path.join(root, LATEST_FILE)
    if os.path.exists(marker):
        try:
            it = int(open(marker, encoding="utf-8").read().strip())
        except ValueError:
            it = None
        if it is not None and it in complete:
            return it
    return complete[-1] if complete else None


# --------------------------------------------------------------------------------------------------------
# filesystem helpers (rank 0 only)
# --------------------------------------------------------------------------------------------------------
def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _prune(root: str, keep_last: int) -> None:
    for it in complete_iterations(root)[:-keep_last]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# state pieces
# --------------------------------------------------------------------------------------------------------
def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "tp": mpu.get_tensor_model_parallel_world_size(),
        "pp": mpu.get_pipeline_model_parallel_world_size(),
        "dp": mpu.get_data_parallel_world_size(),
    }


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _model_sharded_state_dict(model: list[torch.nn.Module]) -> dict[str, Any]:
    """Sharded state of each chunk (of the unwrapped modules, so keys carry no 'module.')."""
    return {f"chunk{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def _uses_distributed_optimizer(optimizer: MegatronOptimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in subs)


def _optimizer_has_state(optimizer: MegatronOptimizer) -> bool:
    """Whether Adam's moments exist yet (they are created by the first step)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    has = torch.tensor(
        float(any(len(o.optimizer.state) > 0 for o in subs if o.optimizer is not None)),
        device=collective_device(),
    )
    dist.all_reduce(has, op=dist.ReduceOp.MAX)  # ranks without parameters in a group still agree
    return bool(has.item())


def _optimizer_sharded_state_dict(
    optimizer: MegatronOptimizer, model_sd: dict[str, Any], *, is_loading: bool
) -> dict[str, Any]:
    if _uses_distributed_optimizer(optimizer):
        from megatron_opd.training import distopt_checkpoint

        return distopt_checkpoint.sharded_state_dict(optimizer, model_sd, is_loading=is_loading)
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading)


def _load_optimizer_state(optimizer: MegatronOptimizer, state: dict[str, Any]) -> None:
    if _uses_distributed_optimizer(optimizer):
        from megatron_opd.training import distopt_checkpoint

        distopt_checkpoint.load_state_dict(optimizer, state)
    else:
        optimizer.load_state_dict(state)


# --------------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------------
def save_checkpoint(
    root: str,
    iteration: int,
    model: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    scheduler: OptimizerParamScheduler | None,
    trainer_state: dict[str, Any],
    *,
    keep_last: int = 2,
) -> str:
    """Save a complete checkpoint for ``iteration`` (collective: every rank calls it). Returns its directory.

    ``trainer_state`` must hold plain types only (numbers, strings, lists, dicts, tensors); a
    ``CheckpointError`` is raised before anything is written otherwise.
    """
    final, tmp = iteration_dir(root, iteration), iteration_dir(root, iteration) + ".tmp"
    state = {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "layout": _layout(),
        "trainer": trainer_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        # 'saved': Adam state is in the checkpoint; 'fresh': no step was taken yet, a new optimizer is the exact
        # state; 'absent': saved without an optimizer (weights only).
        "optimizer_state": "absent"
        if optimizer is None
        else ("saved" if _optimizer_has_state(optimizer) else "fresh"),
        "distributed_optimizer": optimizer is not None and _uses_distributed_optimizer(optimizer),
    }
    # Every rank checks (the state is the same everywhere), so a bad state fails on all ranks, not a hang.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"trainer state is not loadable with weights_only=True (plain types only): {e}"
        ) from e
    try:
        _write(root, tmp, final, iteration, buffer.getvalue(), model, optimizer, state, keep_last)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        if not _is_disk_full(e):
            raise
        raise _disk_full_error(root, tmp, iteration) from e
    return final


def _write(
    root: str,
    tmp: str,
    final: str,
    iteration: int,
    trainer_bytes: bytes,
    model: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    state: dict[str, Any],
    keep_last: int,
) -> None:
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of interrupted saves
            if name.endswith(".tmp") and os.path.isdir(os.path.join(root, name)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
        with open(os.path.join(tmp, TRAINER_STATE_FILE), "wb") as f:
            f.write(trainer_bytes)
    dist.barrier()
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank{rank:05d}.pt"))

    model_sd = _model_sharded_state_dict(model)
    sharded: dict[str, Any] = {"model": model_sd}
    if state["optimizer_state"] == "saved":
        sharded["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False)
    if rank == 0:
        os.makedirs(os.path.join(tmp, "dist"))
    dist.barrier()
    dist_checkpointing.save(sharded, os.path.join(tmp, "dist"))
    dist.barrier()
    write_manifest(tmp)  # last, so a renamed directory always has one
    if rank == 0:
        _fsync_tree(tmp)
        stale = None
        if os.path.isdir(final):
            # An earlier save of this iteration, left behind when a resume fell back past it: superseded. Moved
            # to a '.tmp' name first (never read; removed by the next save if a crash leaves it).
            stale = final + ".stale.tmp"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync_dir(root)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        _write_atomic(os.path.join(root, LATEST_FILE), str(iteration))
        _prune(root, keep_last)
    dist.barrier()


def _is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it, or a rank failure that DCP wrapped) is a full disk or quota."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # torch.save's zip writer reports a failed write as "[enforce fail at inline_container.cc:...] . unexpected
        # pos" or "file write failed", without the errno.
        text = str(x) if not isinstance(x, CheckpointException) else ""
        if (
            "No space left on device" in text
            or "inline_container.cc" in text
            and ("unexpected pos" in text or "file write failed" in text)
        ):
            return True
        if isinstance(x, CheckpointException):
            todo.extend(inner for inner, _ in x.failures.values())
        todo.extend(c for c in (x.__cause__, x.__context__) if c is not None)
    return False


def _disk_full_error(root: str, tmp: str, iteration: int) -> CheckpointError:
    """Remove the half-written checkpoint (it is never read, and its bytes are what the disk lacks) and say
    what happened, where, and what is still there."""
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(
        root if os.path.isdir(root) else os.path.dirname(os.path.abspath(root)) or "."
    ).free
    previous = latest_iteration(root)
    kept = (
        f"the previous checkpoint {iteration_dir(root, previous)} is intact and stays the latest"
        if previous is not None
        else "no earlier checkpoint exists there"
    )
    return CheckpointError(
        f"the disk is full: saving checkpoint {iteration} into {tmp} failed after {written} bytes, and the "
        f"filesystem of {root} has {free} bytes free; the partial checkpoint was removed and {kept}. Free space "
        "there, or set checkpoint.save to a disk with room, then resume with --checkpoint.load"
    )


def _shapes_differ(saved: tuple[int, ...], mine: tuple[int, ...], padded_rows: bool) -> bool:
    # Megatron marks the vocabulary-padded tensors (embedding, output layer) allow_shape_mismatch: their row
    # count follows the TP size, so only the other dimensions identify the architecture.
    return saved[1:] != mine[1:] or len(saved) != len(mine) if padded_rows else saved != mine


def _check_architecture(model_sd: dict[str, Any], path: str) -> None:
    """Refuse a checkpoint of another architecture with one clear message (instead of a shape error deep in
    ``torch.distributed.checkpoint``): every model tensor must be in it with the same global shape."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = safety.load_tensors_metadata(os.path.join(path, "dist"))
    problems = []
    for t in nested_values(model_sd):
        if not isinstance(t, ShardedTensor):
            continue
        if t.key not in saved:
            problems.append(f"{t.key}: not in the checkpoint (this model {tuple(t.global_shape)})")
        elif _shapes_differ(tuple(saved[t.key].global_shape), tuple(t.global_shape), t.allow_shape_mismatch):
            problems.append(
                f"{t.key}: checkpoint {tuple(saved[t.key].global_shape)}, this model {tuple(t.global_shape)}"
            )
    if problems:
        raise CheckpointError(
            f"{path} is a checkpoint of another architecture than model.hf_path's ({len(problems)} tensors differ, "
            f"e.g. {'; '.join(sorted(set(problems))[:3])}); load a checkpoint of this model, or save this run "
            "elsewhere (checkpoint.save / checkpoint.load)"
        )


def _choose_intact(root: str, iteration: int | None) -> int | None:
    """The checkpoint to load (collective): ``iteration`` if given and intact, else the latest one that is intact,
    skipping damaged ones with a warning. None when ``root`` holds no complete checkpoint."""
    if iteration is not None:
        if not os.path.isdir(iteration_dir(root, iteration)):
            raise CheckpointError(f"no complete checkpoint for iteration {iteration} under {root}")
        candidates = [iteration]
    else:
        latest = latest_iteration(root)
        candidates = (
            []
            if latest is None
            else [latest, *(i for i in reversed(complete_iterations(root)) if i < latest)]
        )
    candidates = broadcast_from_rank0(candidates)  # every rank walks the same list
    rank = dist.get_rank() if dist.is_initialized() else 0
    skipped: list[str] = []
    for it in candidates:
        path = iteration_dir(root, it)
        problems = verify_checkpoint(path)
        if problems is None:
            if rank == 0:
                logger.warning("%s has no manifest (saved by an older version): loading it unverified", path)
        elif problems:
            skipped.append(f"{path}: {'; '.join(problems)}")
            continue
        if skipped and rank == 0:
            logger.warning(
                "skipped damaged checkpoints, loading %s instead:\n  %s", path, "\n  ".join(skipped)
            )
        return it
    if not candidates:
        return None
    raise CheckpointError(
        "no intact checkpoint under "
        f"{root}"
        + ("" if iteration is None else f" for iteration {iteration}")
        + ": "
        + " | ".join(skipped)
        + "; restore the named files, or start afresh without --checkpoint.load"
    )


def load_checkpoint(
    root: str,
    model: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    scheduler: OptimizerParamScheduler | None,
    *,
    iteration: int | None = None,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> dict[str, Any] | None:
    """Load the newest intact checkpoint under ``root`` (or ``iteration``) into the given objects (collective).

    A checkpoint whose files do not match its manifest is skipped with a warning for the next older one (not
    when ``iteration`` is given); ``CheckpointError`` naming the damaged files when none is intact.

    Returns the saved state: {'iteration', 'trainer' (the dict given to ``save_checkpoint``), 'layout', ...},
    or None when ``root`` holds no complete checkpoint. The model may be in any TP/PP layout. With
    ``load_optimizer`` the optimizer state must be in the checkpoint (else ``CheckpointError``); pass
    ``optimizer=None`` or ``load_optimizer=False`` to take the weights only (a warning is logged).
    """
    it = _choose_intact(root, iteration)
    if it is None:
        return None
    path = iteration_dir(root, it)
    state = safety.load_torch_file(os.path.join(path, TRAINER_STATE_FILE))
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {state.get('format_version')}, expected {FORMAT_VERSION}"
        )
    want_opt = optimizer is not None and load_optimizer
    if want_opt and state["optimizer_state"] == "absent":
        raise CheckpointError(
            f"{path} holds no optimizer state; resume with checkpoint.load_optimizer=false to start Adam afresh"
        )
    if want_opt and state["optimizer_state"] == "saved":
        saved_dist, now_dist = state["distributed_optimizer"], _uses_distributed_optimizer(optimizer)
        if saved_dist != now_dist:
            kinds = {True: "the distributed optimizer", False: "the regular optimizer"}
            raise CheckpointError(
                f"{path} holds the state of {kinds[saved_dist]} but this run uses {kinds[now_dist]}; set "
                f"optimizer.use_distributed_optimizer={str(saved_dist).lower()} to resume it, or load weights only "
                "with checkpoint.load_optimizer=false"
            )
    if optimizer is not None and not load_optimizer:
        logger.warning("loading weights only from %s: the optimizer state starts afresh", path)

    model_sd = _model_sharded_state_dict(model)
    _check_architecture(model_sd, path)
    sharded: dict[str, Any] = {"model": model_sd}
    if want_opt and state["optimizer_state"] == "saved":
        sharded["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
    loaded = safety.load_sharded(sharded, os.path.join(path, "dist"))
    for i, chunk in enumerate(model):
        unwrap_model(chunk).load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
    if want_opt:
        if state["optimizer_state"] == "saved":
            _load_optimizer_state(optimizer, loaded["optimizer"])
        elif _optimizer_has_state(optimizer):
            raise CheckpointError(
                f"{path} was saved before the first optimizer step; load it into a new optimizer"
            )
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.num_steps = 0  # Megatron's load_state_dict adds the saved count to the current one
            scheduler.load_state_dict(state["scheduler"])
    if load_rng:
        rng_file = os.path.join(path, "rng", f"rank{dist.get_rank():05d}.pt")
        if state["layout"] == _layout() and os.path.exists(rng_file):
            _set_rng_state(safety.load_torch_file(rng_file))
        elif dist.get_rank() == 0:
            logger.warning(
                "checkpoint layout %s differs from the current %s: RNG states are not restored",
                state["layout"],
                _layout(),
            )
    dist.barrier()
    return state
