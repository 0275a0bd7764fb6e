"""What the servers behind ``rollout.sglang_urls`` are, as far as a weight sync is concerned.

Why it exists: a distributed weight sync must reach every SGLang worker and give each as many ranks in the group
as it has tensor-parallel workers. A URL may be a worker (its ``/server_info`` has ``tp_size``) or an
``sglang-router`` (``/get_server_info`` answers with router fields; ``GET /workers`` lists the workers it routes
to). Here a router is replaced by its workers, and each worker's TP size is read. Workers the distributed route
cannot serve are refused with what to do.
"""

from __future__ import annotations

import requests

from megatron_opd.rollout.sglang_client import SGLangClient, redact_url
from megatron_opd.rollout.types import RolloutError

__all__ = ["server_ranks", "weight_sync_urls"]


def _get_json(url: str, path: str, timeout_s: float):
    try:
        r = requests.get(url.rstrip("/") + path, timeout=timeout_s)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def _worker_info(url: str, timeout_s: float) -> dict | None:
    """An SGLang worker's ``/server_info`` (``/get_server_info`` on older servers); None if it has no tp_size
    (an ``sglang-router`` answers ``/get_server_info`` with its own fields)."""
    for path in ("/server_info", "/get_server_info"):
        info = _get_json(url, path, timeout_s)
        if isinstance(info, dict) and "tp_size" in info:
            return info
    return None


def weight_sync_urls(urls: list[str], timeout_s: float = 30.0) -> list[str]:
    """The servers a weight sync must reach: each worker in ``urls`` as it is, and in place of an
    ``sglang-router`` the workers it lists (``GET /workers``), each once. (A router cannot join a process group;
    generation requests may still go through it.)"""
    out: list[str] = []
    for url in urls:
        if _worker_info(url, timeout_s) is None:
            listed = _get_json(url, "/workers", timeout_s)
            workers = listed.get("workers") if isinstance(listed, dict) else None
            if isinstance(workers, list) and workers:
                out += [str(w["url"]) for w in workers if isinstance(w, dict) and "url" in w]
                continue
        out.append(url)
    return list(dict.fromkeys(u.rstrip("/") for u in out))


def server_ranks(client: SGLangClient, timeout_s: float = 30.0) -> list[int]:
    """Ranks each server brings to a weight-sync group: its tensor-parallel size, read from ``/server_info``.
    Refuses what the distributed route cannot serve: data-parallel replicas inside one server (SGLang asserts
    dp_size == 1 there), pipeline stages inside one server, and anything that is not a worker (a router must
    first be replaced by its workers: ``weight_sync_urls``)."""
    out = []
    for url in client.urls:
        info = _worker_info(url, timeout_s)
        name = redact_url(url)
        if info is None:
            raise RolloutError(
                f"rollout server {name} reports no tp_size in /server_info (an sglang-router listing no workers, "
                "or not an SGLang worker): distributed weight sync needs the workers themselves; list each worker "
                "in rollout.sglang_urls (generation may still go through the router), or set rollout.weight_sync "
                "'disk'"
            )
        if int(info.get("dp_size", 1)) > 1:
            raise RolloutError(
                f"rollout server {name} runs dp_size {info['dp_size']}: SGLang's distributed weight update "
                "serves one replica per server; start one server per replica and list each in rollout.sglang_urls"
            )
        if int(info.get("pp_size", 1)) > 1:
            raise RolloutError(
                f"rollout server {name} runs pp_size {info['pp_size']}: distributed weight sync supports "
                "tensor parallelism inside a server only; restart it with --pp-size 1 or use weight_sync 'disk'"
            )
        out.append(int(info["tp_size"]))
    return out
