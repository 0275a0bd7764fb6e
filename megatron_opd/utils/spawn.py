"""Run a function on N local processes joined in a gloo process group, and collect what each returns.

Why it exists: the equivalences that keep a parallel trainer honest (TP=2 == TP=1, PP=2 == PP=1, DP=2 ==
one process) are checked by running the same code on several CPU processes. Tests and small tools share this
one launcher instead of each hand-rolling ``mp.spawn`` and port picking.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - report any failure to the parent with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    ``fn`` must be importable at module level (it is pickled by reference). Results must be picklable by
    ``torch.save`` (tensors, numbers, lists, dicts). A failure on any rank raises with that rank's traceback.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(world_size, port, out_dir, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        errors = []
        try:
            while not ctx.join(timeout=timeout_s):
                pass
        except Exception as e:  # noqa: BLE001 - collect per-rank tracebacks below
            errors.append(str(e))
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank} wrote no result")
                continue
            payload = torch.load(path, weights_only=True)
            if not payload["ok"]:
                errors.append(f"rank {rank} failed:\n{payload['error']}")
            results.append(payload.get("result"))
        if errors:
            raise RuntimeError("\n".join(errors))
        return results
