"""The rollout-engine interface, the factory that builds the configured student engine, and the served-model check.

Why it exists: the training loop samples and syncs weights through this interface only, so the backend
(in-process ``embedded`` on CPU, ``sglang`` servers at scale) is a config switch. ``check_served_model`` refuses
servers that serve another model (the teacher's factory, ``teacher/factory.py``, uses it too). This package does
not import ``teacher/``: the teacher builds on the rollout layer (its decoder, the SGLang client, the error
types), never the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from megatron_opd.config.tree import RolloutConfig
from megatron_opd.rollout.types import RolloutResult

__all__ = ["RolloutEngine", "build_rollout_engine", "check_served_model", "sglang_client"]


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        topk: int = 0,
    ) -> RolloutResult:
        """``n`` samples per prompt of at most ``max_new_tokens`` (the horizon); see ``RolloutResult``."""
        ...

    def update_weights(self, named_tensors: Iterable) -> float:
        """Load HF-named (name, tensor) pairs, or buckets (lists) of them; flush caches. Returns seconds."""
        ...


def sglang_client(urls: list[str], max_concurrency: int, timeout_s: float, max_retries: int, role: str):
    """An ``SGLangClient`` for ``urls`` whose errors name ``role`` (imported lazily: the embedded backends need
    no HTTP stack)."""
    from megatron_opd.rollout.sglang_client import SGLangClient

    return SGLangClient(
        urls, max_concurrency=max_concurrency, timeout_s=timeout_s, max_retries=max_retries, role=role
    )


_FINGERPRINT = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _fingerprint(model_dir: str) -> dict[str, object] | None:
    """The architecture fields of ``model_dir/config.json`` (None when it is not readable from here)."""
    import json
    import os

    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return {k: cfg.get(k) for k in _FINGERPRINT}


def check_served_model(client, expected_dir: str, role: str) -> None:
    """Refuse servers that serve another model than ``expected_dir`` (their ``/model_info`` names a model whose
    config.json differs in architecture or vocabulary) or a non-generative one. Servers that do not answer
    ``/model_info``, or whose model path is not readable from this host, are not checked (a warning says so)."""
    import logging

    import requests

    from megatron_opd.rollout.sglang_client import redact_url
    from megatron_opd.rollout.types import RolloutError

    want = _fingerprint(expected_dir)
    for url in client.urls:
        name = redact_url(url)
        try:
            r = client.get("/model_info", url=url)
            info = r.json() if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            info = None
        if not isinstance(info, dict) or "model_path" not in info:
            logging.getLogger(__name__).warning(
                "%s server %s gave no /model_info: model not checked", role, name
            )
            continue
        served = str(info["model_path"])
        if info.get("is_generation") is False:
            raise RolloutError(f"{role} server {name} serves {served}, a non-generative model")
        got = _fingerprint(served)
        if want is not None and got is not None and got != want:
            diff = ", ".join(f"{k} {got[k]} vs {want[k]}" for k in _FINGERPRINT if got[k] != want[k])
            raise RolloutError(
                f"{role} server {name} serves {served}, not {expected_dir} ({diff}); "
                f"restart it with --model-path {expected_dir} or fix the configured URL"
            )


def embedded_engine_placement(
    params_dtype: str, cuda: bool, cuda_index: int = 0
) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the in-process (embedded) engines: the trainer's CUDA device in the student's dtype
    when CUDA is present; CPU in fp32 otherwise (logprob parity with the trainer's fp32 CPU model: bf16 on CPU
    would be both slow and off by ~1e-2 in log p)."""
    if cuda:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(params_dtype, torch.float32)
        return torch.device("cuda", cuda_index), dtype
    return torch.device("cpu"), torch.float32


def build_rollout_engine(
    cfg: RolloutConfig,
    *,
    hf_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    weight_sync_dir: str | None = None,
    master_address: str = "127.0.0.1",
) -> RolloutEngine:
    """The student engine of ``cfg.backend`` on the model at ``hf_path`` (embedded: on ``device`` in ``dtype``).

    sglang: servers at ``cfg.sglang_urls`` must already serve ``hf_path`` (health is checked now); weight sync per
    ``cfg.weight_sync``: 'distributed' forms a group with this process as its sending rank 0, listening on
    ``cfg.sync_address[0]`` if set, else ``master_address`` (an address of this host the servers can reach:
    loopback only when they run on this node), port ``cfg.sync_port`` (0: a free one), backend
    ``cfg.sync_backend``; each server's TP size is read from it. 'disk' needs ``weight_sync_dir`` (checked here
    rather than at the first sync). The distributed group is formed lazily at the first sync (the trainer may not
    be ready before).
    """
    if cfg.backend == "embedded":
        from megatron_opd.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine.from_hf_dir(hf_path, dtype=dtype, device=device)
    from megatron_opd.rollout.sglang_engine import SGLangEngine
    from megatron_opd.rollout.sglang_topology import weight_sync_urls
    from megatron_opd.rollout.sglang_weights import (
        DiskWeightSync,
        DistributedWeightSync,
        resolve_sync_backend,
    )

    if cfg.weight_sync == "disk" and weight_sync_dir is None:
        raise ValueError("rollout.weight_sync='disk' needs a weight_sync_dir the servers can read")
    client = sglang_client(
        cfg.sglang_urls, cfg.max_concurrency, cfg.request_timeout_s, cfg.max_retries, "rollout"
    )
    from megatron_opd.rollout.sglang_client import redact_url

    if not client.health():
        from megatron_opd.rollout.types import RolloutError

        raise RolloutError(
            f"SGLang rollout servers not healthy (GET /health): {', '.join(redact_url(u) for u in cfg.sglang_urls)}; "
            "check that they run and that rollout.sglang_urls points at them"
        )
    check_served_model(client, hf_path, "student (rollout)")
    # The sync reaches every worker: an sglang-router URL stands for the workers it lists.
    targets = weight_sync_urls(client.urls)
    sync_client = (
        client
        if targets == client.urls
        else sglang_client(targets, 4, cfg.request_timeout_s, cfg.max_retries, "rollout")
    )
    if cfg.weight_sync == "distributed":
        sync = DistributedWeightSync(
            sync_client,
            master_address=cfg.sync_address[0] if cfg.sync_address else master_address,
            master_port=cfg.sync_port,
            backend=resolve_sync_backend(cfg.sync_backend),
            bucket_bytes=cfg.sync_bucket_mb << 20,
            timeout_s=cfg.request_timeout_s,
        )
    else:
        sync = DiskWeightSync(sync_client, hf_dir=hf_path, out_dir=weight_sync_dir)
    return SGLangEngine(client, weight_sync=sync)
