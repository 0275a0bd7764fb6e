"""Weight sync trainer -> SGLang servers after each optimizer step: a collective broadcast, or a checkpoint on disk.

Why it exists: the student's rollout servers must serve the weights of the current step, never stale ones. Both
paths take the trainer's in-memory HF-named tensors (the model/HF mapping) as (name, tensor) pairs or buckets
(lists of pairs), and end by flushing each server's prefix cache (its KV entries were made by the old weights).

``DistributedWeightSync`` (primary): the trainer (rank 0) and every server's TP workers (ranks 1..) form one extra
process group, made once by ``/init_weights_update_group`` (``backend="nccl"`` on GPU, ``"gloo"`` on CPU). Per bucket,
one ``/update_weights_from_distributed`` request announces names/dtypes/shapes while the trainer broadcasts the
tensors in the same order. SGLang 0.5.23 requires the updates inside ``/begin_weight_update`` ...
``/end_weight_update``. Only the one trainer rank that holds the gathered HF tensors may call ``sync``.

``DiskWeightSync`` (fallback): writes the tensors as safetensors next to the model's config/tokenizer files, then
``/update_weights_from_disk`` on every server. Slower (a full write and read) but needs no shared process group.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_opd.rollout.embedded import iter_named_tensors
from megatron_opd.rollout.sglang_client import SGLangClient
from megatron_opd.rollout.types import RolloutError

__all__ = ["DistributedWeightSync", "DiskWeightSync", "buckets_by_bytes", "init_custom_process_group"]


def buckets_by_bytes(
    named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterable[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs into lists of about ``bucket_bytes`` each (a tensor is never split)."""
    bucket, size = [], 0
    for name, t in named:
        if bucket and size + t.numel() * t.element_size() > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def _as_buckets(named_or_buckets, bucket_bytes: int) -> Iterable[list[tuple[str, torch.Tensor]]]:
    items = list(named_or_buckets)
    if items and isinstance(items[0], tuple):
        return buckets_by_bytes(items, bucket_bytes)
    return items


def init_custom_process_group(
    *, backend: str, init_method: str, world_size: int, rank: int, group_name: str, timeout_s: float = 300.0
) -> dist.ProcessGroup:
    """A process group outside the default world (the trainer's own groups stay untouched).

    Mirrors SGLang's ``sglang.srt.utils.init_custom_process_group`` (the server side of the same group):
    rendezvous on ``init_method``, a store prefixed with ``group_name``, then torch's group helper.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        store,
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class DistributedWeightSync:
    """Broadcast-based sync (module docstring). ``server_ranks`` = TP size of each server (1 on CPU)."""

    def __init__(
        self,
        client: SGLangClient,
        *,
        master_address: str = "127.0.0.1",
        master_port: int,
        backend: str = "gloo",
        group_name: str | None = None,
        server_ranks: list[int] | None = None,
        bucket_bytes: int = 256 << 20,
        timeout_s: float = 300.0,
    ):
        self.client = client
        self.master_address, self.master_port = master_address, master_port
        # A fresh name per sync object: a server keeps a group name until it is destroyed, so a crashed trainer's
        # name would otherwise block the next connect.
        self.backend = backend
        self.group_name = group_name or f"opd_weight_sync_{uuid.uuid4().hex[:8]}"
        self.server_ranks = server_ranks or [1] * len(client.urls)
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.group: dist.ProcessGroup | None = None
        self.last_seconds: float | None = None

    def connect(self) -> None:
        """Form the group: every server joins over HTTP while this process joins as rank 0."""
        world = 1 + sum(self.server_ranks)
        errors: list[BaseException] = []

        def join(url: str, offset: int) -> None:
            try:
                out = self.client.post(
                    "/init_weights_update_group",
                    {
                        "master_address": self.master_address,
                        "master_port": self.master_port,
                        "rank_offset": offset,
                        "world_size": world,
                        "group_name": self.group_name,
                        "backend": self.backend,
                    },
                    url=url,
                    timeout_s=self.timeout_s,
                )
                if not out.get("success", False):
                    raise RolloutError(f"{url}/init_weights_update_group: {out.get('message')}")
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)

        threads, offset = [], 1
        for url, n in zip(self.client.urls, self.server_ranks):
            threads.append(threading.Thread(target=join, args=(url, offset), daemon=True))
            offset += n
        for t in threads:
            t.start()
        made: dict = {}

        def rendezvous() -> None:
            try:
                made["group"] = init_custom_process_group(
                    backend=self.backend,
                    init_method=f"tcp://{self.master_address}:{self.master_port}",
                    world_size=world,
                    rank=0,
                    group_name=self.group_name,
                    timeout_s=self.timeout_s,
                )
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        # The trainer's side runs in a thread too: if a server refuses to join, fail now instead of blocking
        # in the rendezvous until its timeout.
        mine = threading.Thread(target=rendezvous, daemon=True)
        mine.start()
        deadline = time.monotonic() + self.timeout_s
        while (mine.is_alive() or any(t.is_alive() for t in threads)) and not errors:
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"weight-sync group {self.group_name} not formed in {self.timeout_s:.0f} s"
                )
            time.sleep(0.05)
        if errors:
            raise RolloutError(f"weight-sync group {self.group_name} could not be formed: {errors[0]}")
        self.group = made["group"]

    def sync(self, named_or_buckets) -> float:
        """Send every tensor (HF names) to every server, then flush their caches. Returns seconds."""
        if self.group is None:
            self.connect()
        t0 = time.perf_counter()
        self._all("/begin_weight_update", {})
        try:
            for bucket in _as_buckets(named_or_buckets, self.bucket_bytes):
                self._send_bucket(bucket)
        finally:
            self._all("/end_weight_update", {})
        self.client.post_all("/flush_cache", {})
        self.last_seconds = time.perf_counter() - t0
        return self.last_seconds

    def _all(self, path: str, payload: dict) -> None:
        for url, out in zip(self.client.urls, self.client.post_all(path, payload, timeout_s=self.timeout_s)):
            if isinstance(out, dict) and out.get("success") is False:
                raise RolloutError(f"{url}{path}: {out.get('message')}")

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        payload = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.group_name,
            "flush_cache": False,
        }
        result: dict = {}

        def announce() -> None:
            try:
                result["outs"] = self.client.post_all(
                    "/update_weights_from_distributed", payload, timeout_s=self.timeout_s
                )
            except BaseException as e:  # noqa: BLE001
                result["error"] = e

        th = threading.Thread(target=announce, daemon=True)
        th.start()
        for _, t in bucket:
            dist.broadcast(t.detach().contiguous(), src=0, group=self.group)
        th.join()
        if "error" in result:
            raise result["error"]
        for url, out in zip(self.client.urls, result["outs"]):
            if not out.get("success", False):
                raise RolloutError(f"{url}/update_weights_from_distributed: {out.get('message')}")

    def close(self) -> None:
        if self.group is not None:
            try:
                self.client.post_all("/destroy_weights_update_group", {"group_name": self.group_name})
            finally:
                dist.destroy_process_group(self.group)
                self.group = None


class DiskWeightSync:
    """Checkpoint-based sync (module docstring). ``hf_dir`` supplies config/tokenizer files copied beside the
    weights; ``out_dir`` must be readable by the servers (a shared filesystem across nodes)."""

    _COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.json", "merges.txt")  # fmt: skip

    def __init__(self, client: SGLangClient, *, hf_dir: str, out_dir: str, keep: int = 1):
        self.client, self.hf_dir, self.out_dir, self.keep = client, hf_dir, out_dir, keep
        self.version = 0
        self.last_seconds: float | None = None

    def sync(self, named_or_buckets) -> float:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        self.version += 1
        path = os.path.join(self.out_dir, f"v{self.version:06d}")
        os.makedirs(path, exist_ok=True)
        tensors = {n: t.detach().cpu().contiguous() for n, t in iter_named_tensors(named_or_buckets)}
        save_file(tensors, os.path.join(path, "model.safetensors"))
        for f in self._COPY:
            if os.path.exists(os.path.join(self.hf_dir, f)):
                shutil.copy(os.path.join(self.hf_dir, f), path)
        for url, out in zip(
            self.client.urls, self.client.post_all("/update_weights_from_disk", {"model_path": path})
        ):
            if not out.get("success", False):
                raise RolloutError(f"{url}/update_weights_from_disk: {out.get('message')}")
        self.client.post_all("/flush_cache", {})
        old = os.path.join(self.out_dir, f"v{self.version - self.keep:06d}")
        if self.version > self.keep and os.path.isdir(old):
            shutil.rmtree(old)
        self.last_seconds = time.perf_counter() - t0
        return self.last_seconds
