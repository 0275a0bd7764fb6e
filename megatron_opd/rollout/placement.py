"""Which GPUs of this node the SGLang servers a run launches get, checked before anything starts.

Why it exists: a launched server defaults to GPU 0, which is trainer rank 0's GPU; SGLang then reserves most of
that GPU's memory for its KV cache (``--mem-fraction-static`` defaults near 0.9) and the trainer runs out of
memory at its first step, far from the cause. Here each server gets the next ``tp`` GPUs after the trainer's
(``--base-gpu-id``); when the node has too few, a server may share GPUs with trainer ranks or another server only
if its ``launch_args`` cap its memory explicitly (``--mem-fraction-static``). Otherwise start-up stops with a
message saying what to set. ``place_servers`` is pure logic on counts (unit-tested on CPU);
``make_launched_servers`` applies it to the servers a run launches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_opd.config.base import ConfigError

__all__ = ["ServerPlacement", "flag_value", "make_launched_servers", "place_servers"]


@dataclass(frozen=True)
class ServerPlacement:
    """One launched server's GPUs: ``base_gpu_id`` .. ``base_gpu_id + len(gpus) - 1``."""

    role: str
    base_gpu_id: int
    gpus: tuple[int, ...]
    shares: bool  # with a trainer rank or an earlier server (allowed only under an explicit memory cap)
    explicit: bool  # the launch_args gave --base-gpu-id themselves

    def launch_args(self) -> list[str]:
        """What to add to the server's command line (nothing when it chose its GPU itself)."""
        return [] if self.explicit else ["--base-gpu-id", str(self.base_gpu_id)]


def flag_value(args: Sequence[str], *names: str) -> str | None:
    """The value of the first of ``names`` in a command line (``--flag value`` or ``--flag=value``)."""
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def place_servers(
    *, num_gpus: int, trainer_gpus: int, servers: Sequence[tuple[str, Sequence[str]]]
) -> list[ServerPlacement]:
    """GPUs for each ``(role, launch_args)`` server on a node with ``num_gpus`` GPUs whose first ``trainer_gpus``
    run trainer ranks (local ranks 0..trainer_gpus-1). A server's TP size and an explicit ``--base-gpu-id`` are
    read from its ``launch_args``. Raises ``ConfigError`` for a layout that does not fit or shares a GPU without
    ``--mem-fraction-static``."""
    used: dict[int, str] = {g: f"trainer rank {g}" for g in range(min(trainer_gpus, num_gpus))}
    next_free = trainer_gpus
    out = []
    for role, args in servers:
        tp = int(flag_value(args, "--tp-size", "--tp", "--tensor-parallel-size") or 1)
        given = flag_value(args, "--base-gpu-id")
        if given is not None:
            base = int(given)
        elif next_free + tp <= num_gpus:
            base = next_free
        else:
            base = 0  # no free GPUs left: share from the first one (refused below unless memory is capped)
        gpus = tuple(range(base, base + tp))
        if gpus[-1] >= num_gpus:
            raise ConfigError(
                f"config key '{role}.launch_args': the {role} server needs GPUs {gpus[0]}..{gpus[-1]} (TP {tp}) "
                f"but this node has {num_gpus}; lower its --tp-size or --base-gpu-id, or start it on another node "
                f"and give its URL in {role}.sglang_urls"
            )
        shared = sorted({used[g] for g in gpus if g in used})
        if shared and flag_value(args, "--mem-fraction-static") is None:
            raise ConfigError(
                f"config key '{role}.launch_args': the {role} server would run on GPU(s) {list(gpus)}, shared "
                f"with {', '.join(shared)}, with no memory cap. Add '--mem-fraction-static F' to {role}.launch_args "
                f"(F: the share of each GPU SGLang may take, leaving the rest to the trainer), or free GPUs for it "
                f"(fewer trainer processes per node: this node has {num_gpus} GPUs, the trainer uses "
                f"{trainer_gpus}), or start it elsewhere and give its URL in {role}.sglang_urls"
            )
        for g in gpus:
            used.setdefault(g, f"the {role} server")
        next_free = max(next_free, base + tp)
        out.append(ServerPlacement(role, base, gpus, bool(shared), given is not None))
    return out


def make_launched_servers(
    wanted: Sequence[tuple[str, Sequence[str], str]], *, params_dtype: str, log_dir: str | None
) -> dict:
    """``SGLangServer`` objects (not started) for each ``(role, launch_args, model_path)``: on CUDA placed by
    ``place_servers`` (this node's trainer ranks: ``LOCAL_WORLD_SIZE``), in the trainer's dtype; on CPU fp32 (the
    logprob parity with the trainer: an fp16 KV cache moved logprobs by up to 0.07) with a small KV cache."""
    import torch

    from megatron_opd.rollout.sglang_server import SGLangServer

    cuda = torch.cuda.is_available()
    extra: dict[str, list[str]] = {}
    if cuda:
        plan = place_servers(
            num_gpus=torch.cuda.device_count(),
            trainer_gpus=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            servers=[(role, args) for role, args, _ in wanted],
        )
        extra = {p.role: p.launch_args() for p in plan}
    return {
        role: SGLangServer(
            path,
            device="cuda" if cuda else "cpu",
            dtype=params_dtype if cuda else "float32",
            max_total_tokens=None if cuda else 8192,
            extra_args=[*args, *extra.get(role, [])],
            log_path=os.path.join(log_dir, f"sglang_{role}.log") if log_dir else None,
        )
        for role, args, path in wanted
    }
