"""Gaussian policies of the control tasks: the MLP of Table 4, the Transformer of Table 5, an analytic teacher.

Why it exists: OPD needs two views of one policy, incremental (``step``: one action at a time while rolling
out, like generation with a KV cache) and parallel (``forward``: every position of a recorded trajectory at
once, like the trainer's forward pass). Both must give the same numbers; ``tests/unit/test_control_policies.py``
checks it, the control analogue of "rollout-engine logprobs == trainer logprobs".

Each policy carries its task id (0: the student's initial task, 1: the teacher's task, Section 3.1) and
feeds it to the network itself, so teacher and student can score the same observation sequence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_opd.control.gaussian import GaussianHead


class ControlPolicy(nn.Module):
    """Interface: ``forward(obs [B, S, O]) -> (mean, log_std)`` each [B, S, 2]; ``step`` is its causal,
    one-position-at-a-time equivalent with a cache from ``init_cache``."""

    def init_cache(self, batch: int) -> Any:
        return None

    def step(self, obs: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """obs [B, O] at the next position -> (mean [B, 2], log_std [B, 2], new cache)."""
        mean, log_std = self.forward(obs.unsqueeze(1))
        return mean[:, 0], log_std[:, 0], cache


class MLPPolicy(ControlPolicy):
    """Table 4: 3 hidden Tanh layers of width 64 on [task id, observation]; Markov in the observation."""

    def __init__(
        self,
        obs_dim: int,
        task_id: int,
        *,
        hidden: int = 64,
        layers: int = 3,
        action_scale: float = 0.8,
        min_std: float = 0.5,
    ) -> None:
        super().__init__()
        self.task_id = task_id
        dims = [obs_dim + 1] + [hidden] * layers
        body: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.Tanh()]
        self.body = nn.Sequential(*body)
        self.head = GaussianHead(hidden, 2, action_scale, min_std)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tid = torch.full_like(obs[..., :1], float(self.task_id))
        return self.head(self.body(torch.cat([tid, obs], dim=-1)))


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, d] -> [B, h, L, d/h]
        B, L, d = x.shape
        return x.view(B, L, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, source: torch.Tensor | None = None, *, causal: bool = False, cache=None
    ) -> tuple[torch.Tensor, Any]:
        """Self-attention (source None) or cross-attention to ``source``; ``cache`` holds past (k, v) for
        incremental causal self-attention, in which case x is the newest position only."""
        q = self._split(self.q(x))
        k, v = (self._split(t) for t in self.kv(x if source is None else source).chunk(2, dim=-1))
        if cache is not None:
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache = (k, v)
            causal = False  # the new query may see every cached key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        B, h, L, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(B, L, h * dh)), cache


class _MLP(nn.Sequential):
    def __init__(self, d: int) -> None:
        super().__init__(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class _EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = (
            nn.LayerNorm(d),
            _Attention(d, heads),
            nn.LayerNorm(d),
            _MLP(d),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))[0]
        return x + self.mlp(self.ln2(x))


class _DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.self_attn = nn.LayerNorm(d), _Attention(d, heads)
        self.ln2, self.cross_attn = nn.LayerNorm(d), _Attention(d, heads)
        self.ln3, self.mlp = nn.LayerNorm(d), _MLP(d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache=None) -> tuple[torch.Tensor, Any]:
        a, cache = self.self_attn(self.ln1(x), causal=True, cache=cache)
        x = x + a
        x = x + self.cross_attn(self.ln2(x), memory)[0]
        return x + self.mlp(self.ln3(x)), cache


class TransformerPolicy(ControlPolicy):
    """Table 5: pre-LN encoder-decoder Transformer, d = 64, 4 heads, 2 + 2 layers, GELU, no dropout.

    The encoder reads the task id (one token); the decoder reads the velocity-history tokens [v_t, t/T]
    causally and cross-attends to the encoder, so the action at t depends on the whole history up to t.
    """

    def __init__(
        self,
        obs_dim: int,
        task_id: int,
        *,
        max_len: int,
        d: int = 64,
        heads: int = 4,
        enc_layers: int = 2,
        dec_layers: int = 2,
        action_scale: float = 0.1,
        min_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.task_id = task_id
        self.task_embed = nn.Embedding(2, d)
        self.obs_embed = nn.Linear(obs_dim, d)
        self.pos_embed = nn.Embedding(max_len, d)
        self.encoder = nn.ModuleList(_EncoderLayer(d, heads) for _ in range(enc_layers))
        self.enc_norm = nn.LayerNorm(d)
        self.decoder = nn.ModuleList(_DecoderLayer(d, heads) for _ in range(dec_layers))
        self.dec_norm = nn.LayerNorm(d)
        self.head = GaussianHead(d, 2, action_scale, min_std)

    def _memory(self, batch: int) -> torch.Tensor:  # [B, 1, d]
        x = self.task_embed.weight[self.task_id].view(1, 1, -1)
        for layer in self.encoder:
            x = layer(x)
        return self.enc_norm(x).expand(batch, -1, -1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = obs.shape
        memory = self._memory(B)
        x = self.obs_embed(obs) + self.pos_embed.weight[:S]
        for layer in self.decoder:
            x, _ = layer(x, memory)
        return self.head(self.dec_norm(x))

    def init_cache(self, batch: int) -> dict[str, Any]:
        return {"memory": self._memory(batch), "t": 0, "kv": [(None, None)] * len(self.decoder)}

    def step(self, obs: torch.Tensor, cache: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        t = cache["t"]
        x = self.obs_embed(obs.unsqueeze(1)) + self.pos_embed.weight[t]
        kv = []
        for layer, c in zip(self.decoder, cache["kv"]):
            x, c = layer(x, cache["memory"], cache=c)
            kv.append(c)
        mean, log_std = self.head(self.dec_norm(x))
        return mean[:, 0], log_std[:, 0], {"memory": cache["memory"], "t": t + 1, "kv": kv}


class AnalyticTeacher(ControlPolicy):
    """The optimal teacher of Appendix E.1 for the simple task: step straight at the target, capped at the
    action scale, with a fixed std. It is exact everywhere, so its log-ratio carries no state-dependent
    noise; Fig. 14 distils it with sequence-level OPD."""

    def __init__(self, target: torch.Tensor, distance: float, *, action_scale: float = 0.8, std: float = 0.1):
        super().__init__()
        self.register_buffer("target", target.float().clone())
        self.distance, self.action_scale = distance, action_scale
        self.log_std_value = float(torch.log(torch.tensor(std)))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = obs[..., :2] * self.distance
        delta = self.target - pos
        norm = delta.norm(dim=-1, keepdim=True)
        mean = delta * torch.clamp(self.action_scale / norm.clamp(min=1e-8), max=1.0)
        return mean, torch.full_like(mean, self.log_std_value)
