"""Weight sync trainer -> SGLang servers after each optimizer step: a collective broadcast, or a checkpoint on disk.

Why it exists: the student's rollout servers must serve the weights of the current step, never stale ones. Both
paths take the trainer's in-memory HF-named tensors (the model/HF mapping) as (name, tensor) pairs or buckets
(lists of pairs). Around the transfer every server is paused (``/pause_generation``, mode 'retract') and inside
``/begin_weight_update`` ... ``/end_weight_update`` (SGLang 0.5.23 refuses updates outside); afterwards its prefix
cache is flushed (its KV entries were made by the old weights) and generation continues (``open_update`` /
``close_update``, called once per sync by the controller).

``DistributedWeightSync`` (primary): one sending trainer rank (rank 0 of the group) and every server's TP workers
(ranks 1.., each server's count read from its ``/server_info``) form one extra process group, made once by
``/init_weights_update_group``; its store binds the configured address only. With pipeline parallelism each
stage's sender has its own group and sends its own layers. Per bucket, one ``/update_weights_from_distributed``
request (never retried: it is a collective) announces names/dtypes/shapes while the sender broadcasts the tensors
from where they lie (GPU memory under NCCL; a CPU copy only when gloo is given CUDA tensors). A failure tears
the group down and raises an error naming the server; the next sync forms a fresh group.

``DiskWeightSync`` (fallback): writes the tensors as safetensors next to the model's config/tokenizer files (one
file per pipeline stage), then ``/update_weights_from_disk`` on every server. Slower (a full write and read) but
needs no shared process group.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from megatron_opd.rollout.embedded import iter_named_tensors
from megatron_opd.rollout.sglang_client import SGLangClient, redact_url
from megatron_opd.rollout.sglang_topology import server_ranks
from megatron_opd.rollout.types import RolloutError

__all__ = [
    "DiskWeightSync",
    "DistributedWeightSync",
    "buckets_by_bytes",
    "close_update",
    "default_sync_address",
    "init_custom_process_group",
    "listen_socket",
    "open_update",
    "resolve_sync_backend",
]

logger = logging.getLogger(__name__)


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


def listen_socket(address: str, port: int) -> socket.socket:
    """A TCP socket listening on ``address`` only (port 0: a free one), for the group's store: torch's own
    TCPStore server would listen on every interface (``*:port``)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        raise RolloutError(
            f"weight-sync store cannot listen on {address}:{port} ({e}); set rollout.sync_address to an address "
            "of this node the servers can reach, and rollout.sync_port to a free port (or 0)"
        ) from e
    sock.listen(128)
    return sock


def init_custom_process_group(
    *, backend: str, store: dist.Store, world_size: int, rank: int, group_name: str, timeout_s: float = 300.0
) -> dist.ProcessGroup:
    """A process group outside the default world (the trainer's own groups stay untouched), on ``store``.

    The server side of the same group is SGLang's ``init_custom_process_group``: it rendezvous on the store's
    address, prefixes the store with ``group_name`` and calls torch's group helper, as done here.
    """
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _is_loopback(host: str | None) -> bool:
    if host is None or host == "localhost":
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_sync_address(urls: list[str]) -> str:
    """The address servers at ``urls`` can dial back to this node: loopback when all of them are local, else the
    source address of this node's route to the first remote one (no packet is sent: a UDP socket only routes)."""
    remote = [urlsplit(u) for u in urls if not _is_loopback(urlsplit(u).hostname)]
    if not remote:
        return "127.0.0.1"
    family = socket.AF_INET6 if ":" in (remote[0].hostname or "") else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((remote[0].hostname, remote[0].port or 80))
        return s.getsockname()[0]


def resolve_sync_backend(backend: str) -> str:
    """'auto' -> 'nccl' with CUDA, 'gloo' without; 'nccl' without CUDA is refused with what to set."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("rollout.sync_backend 'nccl' needs CUDA on the trainer; set it to 'gloo' or 'auto'")
    return backend


def open_update(client: SGLangClient, timeout_s: float) -> None:
    """Before a sync, on every server: stop scheduling ('retract' keeps queued requests for later, and lets the
    cache be flushed), then open the weight-update session."""
    _all(client, "/pause_generation", {"mode": "retract"}, timeout_s)
    _all(client, "/begin_weight_update", {}, timeout_s)


def close_update(client: SGLangClient, timeout_s: float) -> None:
    """After a sync, on every server: close the session, drop the prefix cache (old weights' KV), resume."""
    try:
        _all(client, "/end_weight_update", {}, timeout_s)
        _all(client, "/flush_cache", {}, timeout_s)
    finally:
        _all(client, "/continue_generation", {}, timeout_s)


def _all(client: SGLangClient, path: str, payload: dict, timeout_s: float) -> None:
    for url, out in zip(client.urls, client.post_all(path, payload, timeout_s=timeout_s)):
        if isinstance(out, dict) and out.get("success") is False:
            raise RolloutError(f"rollout server {redact_url(url)}{path} failed: {out.get('message')}")


class DistributedWeightSync:
    """Broadcast-based sync from one sending rank (module docstring). ``server_ranks``: each server's TP size
    (read from the servers when None). ``backend`` 'nccl' sends CUDA tensors as they are; 'gloo' sends CPU ones
    (CUDA tensors are copied to CPU first, gloo's CUDA support being partial)."""

    def __init__(
        self,
        client: SGLangClient,
        *,
        master_address: str = "127.0.0.1",
        master_port: int = 0,
        backend: str = "gloo",
        group_name: str | None = None,
        server_ranks: list[int] | None = None,
        bucket_bytes: int = 256 << 20,
        timeout_s: float = 300.0,
    ):
        self.client = client
        self.master_address, self.master_port = master_address, master_port
        self.backend = backend
        # A fresh name per group: a server keeps a group name until it is destroyed, so a crashed trainer's name
        # (or a torn-down group's) would otherwise block the next connect.
        self._base_name = group_name or f"opd_weight_sync_{uuid.uuid4().hex[:8]}"
        self._generation = 0
        self.group_name = self._base_name
        self.server_ranks = server_ranks
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.group: dist.ProcessGroup | None = None
        self._store: dist.Store | None = None
        self.port: int | None = None  # the port the store listens on, once connected
        self.last_seconds: float | None = None
        self.last_bytes = 0

    def connect(self) -> None:
        """Form the group: every server joins over HTTP while this process joins as rank 0 (its store binds
        ``master_address`` only)."""
        if self.server_ranks is None:
            self.server_ranks = server_ranks(self.client)
        if self._generation:
            self.group_name = f"{self._base_name}_{self._generation}"
        world = 1 + sum(self.server_ranks)
        errors: list[BaseException] = []
        # Listen before any server is told where to dial (port 0 becomes a free port now, race-free).
        sock = listen_socket(self.master_address, self.master_port)
        port = sock.getsockname()[1]

        def join(url: str, offset: int) -> None:
            try:
                out = self.client.post(
                    "/init_weights_update_group",
                    {
                        "master_address": self.master_address,
                        "master_port": port,
                        "rank_offset": offset,
                        "world_size": world,
                        "group_name": self.group_name,
                        "backend": self.backend,
                    },
                    url=url,
                    timeout_s=self.timeout_s,
                    retry=False,
                )
                if not out.get("success", False):
                    raise RolloutError(
                        f"rollout server {redact_url(url)}/init_weights_update_group: {out.get('message')}"
                    )
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
                made["store"] = dist.TCPStore(
                    self.master_address,
                    port,
                    world,
                    True,
                    timedelta(seconds=self.timeout_s),
                    master_listen_fd=sock.detach(),  # the store owns (and closes) the listening socket now
                )
                made["group"] = init_custom_process_group(
                    backend=self.backend,
                    store=made["store"],
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
                self._generation += 1
                sock.close()
                raise RolloutError(
                    f"weight-sync group {self.group_name} not formed in {self.timeout_s:.0f} s (servers "
                    f"{[redact_url(u) for u in self.client.urls]} dial {self.master_address}:{port}; "
                    "check rollout.sync_address is reachable from them)"
                )
            time.sleep(0.05)
        if errors:
            self._generation += 1
            sock.close()
            raise RolloutError(f"weight-sync group {self.group_name} could not be formed: {errors[0]}")
        self.group, self._store = made["group"], made["store"]
        self.port = port

    def send(self, named_or_buckets) -> int:
        """Broadcast every tensor (HF names) to every server, inside a session ``open_update`` opened (by this
        process or by the controller). Returns bytes sent."""
        if self.group is None:
            self.connect()
        sent = 0
        for bucket in _as_buckets(named_or_buckets, self.bucket_bytes):
            sent += self._send_bucket(bucket)
        return sent

    def sync(self, named_or_buckets) -> float:
        """The whole sync from this one sender: pause, send, flush, continue. Returns seconds."""
        t0 = time.perf_counter()
        if self.group is None:
            self.connect()
        open_update(self.client, self.timeout_s)
        try:
            self.last_bytes = self.send(named_or_buckets)
        finally:
            close_update(self.client, self.timeout_s)
        self.last_seconds = time.perf_counter() - t0
        return self.last_seconds

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.backend == "gloo" and t.is_cuda:
            return t.cpu()
        if self.backend == "nccl" and not t.is_cuda:
            return t.cuda()
        return t.contiguous()

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        payload = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.group_name,
            "flush_cache": False,
        }
        outs: dict[str, object] = {}

        def announce(url: str) -> None:
            try:
                outs[url] = self.client.post(
                    "/update_weights_from_distributed",
                    payload,
                    url=url,
                    timeout_s=self.timeout_s,
                    retry=False,
                )
            except BaseException as e:  # noqa: BLE001 - reported below, naming the server
                outs[url] = e

        threads = [threading.Thread(target=announce, args=(u,), daemon=True) for u in self.client.urls]
        for th in threads:
            th.start()
        wire = [self._wire(t) for _, t in bucket]
        try:
            # One broadcast per tensor from where it lies, as the servers receive them (no flattening copy).
            handles = [dist.broadcast(t, src=0, group=self.group, async_op=True) for t in wire]
            for h in handles:
                h.wait()
        except Exception as e:  # noqa: BLE001 - a server gone mid-broadcast: name the ones that failed
            self._teardown()
            failed = [redact_url(u) for u, o in outs.items() if not isinstance(o, dict)] or "unknown"
            raise RolloutError(
                f"weight-sync broadcast on group {self.group_name} failed ({e}); servers that failed: {failed}. "
                "The group was torn down; the next sync forms a new one"
            ) from e
        for th in threads:
            th.join(self.timeout_s)
        for url in self.client.urls:
            out = outs.get(url)
            if not (isinstance(out, dict) and out.get("success", False)):
                self._teardown()
                why = out if isinstance(out, BaseException) else (out or {}).get("message", "no answer")
                raise RolloutError(
                    f"rollout server {redact_url(url)}/update_weights_from_distributed failed: {why}. Not retried "
                    f"(a collective); group {self.group_name} torn down, the next sync forms a new one"
                )
        return sum(t.numel() * t.element_size() for t in wire)

    def _teardown(self) -> None:
        """Leave a group that failed: servers asked to drop it (best effort), local side destroyed."""
        group, self.group = self.group, None
        self._generation += 1
        try:
            self.client.post_all(
                "/destroy_weights_update_group", {"group_name": self.group_name}, timeout_s=10, retry=False
            )
        except Exception as e:  # noqa: BLE001 - a dead server cannot answer; the error raised next names it
            logger.warning("dropping weight-sync group %s on the servers: %s", self.group_name, e)
        if group is not None:
            try:
                dist.destroy_process_group(group)
            except Exception as e:  # noqa: BLE001
                logger.warning("destroying weight-sync group %s: %s", self.group_name, e)
        self._release_store()

    def _release_store(self) -> None:
        self._store = None  # closes its listening socket

    def close(self) -> None:
        if self.group is not None:
            try:
                self.client.post_all(
                    "/destroy_weights_update_group", {"group_name": self.group_name}, retry=False
                )
            finally:
                dist.destroy_process_group(self.group)
                self.group = None
                self._release_store()


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
        """The whole sync from one writer: write every tensor, then reload on every server. Returns seconds."""
        t0 = time.perf_counter()
        self.write(named_or_buckets)
        self.commit()
        self.last_seconds = time.perf_counter() - t0
        return self.last_seconds

    def write(self, named_or_buckets, part: int = 0) -> int:
        """Write one part (a pipeline stage's tensors) of the next version; every part's writer calls this once
        per sync, then one process calls ``commit``. Returns bytes written."""
        from safetensors.torch import save_file

        path = os.path.join(self.out_dir, f"v{self.version + 1:06d}")
        os.makedirs(path, exist_ok=True)
        tensors = {n: t.detach().cpu().contiguous() for n, t in iter_named_tensors(named_or_buckets)}
        save_file(tensors, os.path.join(path, f"model-part{part:03d}.safetensors"))
        self.version += 1
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def commit(self) -> None:
        """Point every server at the version just written (all parts), flush caches, drop the old version."""
        path = os.path.join(self.out_dir, f"v{self.version:06d}")
        for f in self._COPY:
            if os.path.exists(os.path.join(self.hf_dir, f)):
                shutil.copy(os.path.join(self.hf_dir, f), path)
        for url, out in zip(
            self.client.urls, self.client.post_all("/update_weights_from_disk", {"model_path": path})
        ):
            if not out.get("success", False):
                raise RolloutError(f"{redact_url(url)}/update_weights_from_disk: {out.get('message')}")
        self.client.post_all("/flush_cache", {})
        old = os.path.join(self.out_dir, f"v{self.version - self.keep:06d}")
        if self.version > self.keep and os.path.isdir(old):
            shutil.rmtree(old)
