"""A compact pure-torch Qwen2/Llama decoder that loads Hugging Face-named weights, for in-process rollouts.

Why it exists: on a CPU box there is no SGLang/vLLM worth running beside the trainer, and `transformers`'
`generate` is slow and hard to drive with a preallocated KV cache. This is the model the embedded engine
(``rollout/embedded.py``) samples from and the embedded teacher (``teacher/embedded.py``) scores with: one forward
with an explicit KV cache, GQA, RoPE, RMSNorm, optional QKV bias, SwiGLU, tied or untied LM head. Weights keep their
HF names (``model.layers.0.self_attn.q_proj.weight``...), so the trainer's in-memory HF mapping can be synced in
without conversion. Everything runs in the dtype of the weights (fp32 for parity tests).

Padding: ``forward`` takes explicit ``positions`` [B, L] and a key-validity mask, so prompts may be left-padded
(generation) or right-padded (scoring); pad positions never attend or get attended to by valid tokens.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DecoderConfig", "Decoder", "KVCache", "load_hf_state_dict"]


@dataclass(kw_only=True)
class DecoderConfig:
    """Architecture of a Qwen2/Llama decoder, read from an HF ``config.json``."""

    vocab_size: int
    """Embedding rows (may exceed the tokenizer's vocabulary when padded)."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    """Qwen2: True; Llama: ``attention_bias`` (usually False)."""
    tie_word_embeddings: bool

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> DecoderConfig:
        """Build from the parsed ``config.json``; refuses architectures/rope scalings this decoder does not implement."""
        model_type = cfg.get("model_type")
        if model_type not in ("qwen2", "llama"):
            raise NotImplementedError(f"embedded decoder supports qwen2/llama, not model_type={model_type!r}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(
                f"embedded decoder implements default RoPE only, not rope_type={rope_type!r}"
            )
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            raise NotImplementedError("embedded decoder does not implement Qwen2 sliding-window attention")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            qkv_bias=True if model_type == "qwen2" else bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> DecoderConfig:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))


def load_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in an HF directory, by HF name."""
    from safetensors.torch import load_file

    from megatron_opd.model.hf_conversion.hf_files import SAFETENSORS_READ_ERRORS, corrupt_safetensors
    from megatron_opd.utils.errors import MissingFileError

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise MissingFileError(f"no *.safetensors weights in {path}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(f))
        except SAFETENSORS_READ_ERRORS as e:
            raise corrupt_safetensors(f, e) from e
    return out


class KVCache:
    """Preallocated keys/values for every layer: [num_layers, B, num_kv_heads, max_len, head_dim] each."""

    def __init__(
        self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # HF computes the norm in fp32 and casts back before the weight multiply; match it for bf16 parity. In fp32
    # that is torch's own rms_norm (bit-identical, a few dispatcher calls fewer per token).
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` with the sign of ``rotate_half`` folded into ``sin_signed``
    ([-sin | sin] halves): the half swap is one ``flip`` of a [..., 2, D/2] view. x [..., D], cos/sin broadcastable."""
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin_signed


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one new query per row over the cache, grouped-query heads sharing their key/value head.

    q [B, 1, H, D]; k, v [B, Hkv, S, D] (views of the cache); bias [B * Hkv, H / Hkv, S] additive mask -> [B, 1, H * D].
    Query head h reads key/value head h // (H / Hkv), as HF's ``repeat_kv`` pairs them.
    """
    B, _, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B * Hkv, H // Hkv, D)
    scores = torch.baddbmm(bias, qg, k.reshape(B * Hkv, S, D).transpose(1, 2), alpha=D**-0.5)
    out = torch.bmm(torch.softmax(scores, -1), v.reshape(B * Hkv, S, D))  # [B * Hkv, G, D]
    return out.reshape(B, 1, H * D)


class Decoder:
    """Qwen2/Llama forward over HF-named weights with an explicit KV cache (no nn.Module: nothing trains here)."""

    def __init__(self, cfg: DecoderConfig, state: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.params: dict[str, torch.Tensor] = {}
        self.load(state.items(), strict=True)
        any_w = self.params["model.embed_tokens.weight"]
        self.dtype, self.device = any_w.dtype, any_w.device
        self._fuse()
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self._inv_freq = inv.to(self.device)
        self._rope_cos = self._rope_sin = torch.empty(0, cfg.head_dim, dtype=self.dtype, device=self.device)

    @classmethod
    def from_hf_dir(
        cls, path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> Decoder:
        state = {k: v.to(device=device, dtype=dtype) for k, v in load_hf_state_dict(path).items()}
        return cls(DecoderConfig.from_hf_dir(path), state)

    def _fuse(self) -> None:
        """Store q/k/v (and gate/up) of each layer in one tensor, the HF-named params becoming views of it.

        One GEMM instead of three (two) per layer per step; ``load`` copies into the views, so in-place weight
        updates reach the fused tensors with no second copy of the weights.
        """
        c, p = self.cfg, self.params
        self.fused: dict[str, torch.Tensor] = {}
        for i in range(c.num_layers):
            pre = f"model.layers.{i}."
            groups = {
                "qkv.weight": [pre + f"self_attn.{n}_proj.weight" for n in "qkv"],
                "gate_up.weight": [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"],
            }
            if c.qkv_bias:
                groups["qkv.bias"] = [pre + f"self_attn.{n}_proj.bias" for n in "qkv"]
            for key, names in groups.items():
                fused = torch.cat([p[n] for n in names], 0)
                self.fused[pre + key] = fused
                row = 0
                for n in names:
                    p[n] = fused[row : row + p[n].shape[0]]
                    row += p[n].shape[0]

    def expected_names(self) -> list[str]:
        c = self.cfg
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
            if c.qkv_bias:
                names += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
            names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        if not c.tie_word_embeddings:
            names.append("lm_head.weight")
        return names

    def load(self, named: Iterable[tuple[str, torch.Tensor]], *, strict: bool = False) -> int:
        """Copy HF-named tensors in (in place once loaded). Returns how many were set.

        Unknown names raise (a silently ignored tensor is a silent stale weight); ``lm_head.weight`` of a tied model
        is accepted and ignored (it is the embedding). ``strict`` also requires every expected name.
        """
        expected = set(self.expected_names())
        seen: set[str] = set()
        for name, t in named:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            if name not in expected:
                raise KeyError(f"unexpected weight {name!r} for this decoder")
            cur = self.params.get(name)
            if cur is None:
                self.params[name] = t.detach().clone()
            else:
                if cur.shape != t.shape:
                    raise ValueError(f"weight {name!r}: shape {tuple(t.shape)} != {tuple(cur.shape)}")
                cur.copy_(t.detach())
            seen.add(name)
        if strict and expected - seen:
            raise KeyError(f"missing weights: {sorted(expected - seen)[:5]}...")
        return len(seen)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (``_apply_rope``) at ``positions`` [B, L] -> [B, L, 1, D] each.

        Rows of a table over positions [0, P), grown on demand: HF's fp32 ``position * inv_freq`` for an integer
        position is the same number whichever tensor it is computed in, so the table is bit-identical to computing
        the angles per call, and a decode step gathers two rows instead of recomputing them.
        """
        need = int(positions.max()) + 1
        if need > self._rope_cos.shape[0]:
            n = max(need, 2 * self._rope_cos.shape[0], 128)
            freqs = torch.arange(n, dtype=torch.float32, device=self.device)[:, None] * self._inv_freq
            self._rope_cos = torch.cat((freqs, freqs), -1).cos().to(self.dtype)
            self._rope_sin = torch.cat((-freqs.sin(), freqs.sin()), -1).to(self.dtype)
        return self._rope_cos[positions].unsqueeze(2), self._rope_sin[positions].unsqueeze(2)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        cache: KVCache | None = None,
        cache_start: int = 0,
        *,
        decode_step: bool = False,
    ) -> torch.Tensor:
        """Hidden states after the final norm.

        input_ids, positions: [B, L] (pad ids may be anything in-vocab). key_valid: [B, S] bool, S = cache_start + L
        (S = L without a cache): which keys exist. With a cache, the new keys/values are written at
        [cache_start, cache_start + L) and attention runs over [0, S). Attention is causal in cache order.
        ``decode_step``: the caller promises L == 1 and that every row's new key is valid (``key_valid[:, S - 1]``),
        as the engine's decode loop does; attention is then ``_decode_attention`` (one query per row: two batched
        GEMMs and a softmax, cheaper on CPU than SDPA's kernel for a single query) over an additive mask built once
        for all layers. Returns [B, L, hidden].
        """
        c, p = self.cfg, self.params
        B, L = input_ids.shape
        S = cache_start + L
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        x = F.embedding(input_ids, p["model.embed_tokens.weight"])
        cos, sin = self._rope(positions)  # [B, L, 1, D]
        if decode_step:
            if L != 1:
                raise ValueError(f"decode_step=True needs one new token per row, got L={L}")
            if cache is None:
                raise ValueError("decode_step=True needs the KV cache of the earlier tokens")
            # [B * Hkv, G, S]: 0 for a valid key, -inf otherwise (the row's own new key is valid: no empty row).
            bias = torch.where(key_valid[:, :S], 0.0, float("-inf")).to(self.dtype)
            bias = bias[:, None, None, :].expand(B, Hkv, H // Hkv, S).reshape(B * Hkv, H // Hkv, S)
        else:
            q_idx = torch.arange(cache_start, S, device=self.device)
            causal = q_idx[:, None] >= torch.arange(S, device=self.device)[None, :]  # [L, S]
            mask = causal[None, None] & key_valid[:, None, None, :S]  # [B, 1, L, S]
            # A query whose keys are all masked (a pad row) would give NaN; let it see itself (output ignored).
            mask = mask | (
                ~mask.any(-1, keepdim=True) & (q_idx[:, None] == torch.arange(S, device=self.device))
            )
        for i in range(c.num_layers):
            pre = f"model.layers.{i}."
            h = _rms_norm(x, p[pre + "input_layernorm.weight"], c.rms_norm_eps)
            qkv = F.linear(h, self.fused[pre + "qkv.weight"], self.fused.get(pre + "qkv.bias"))
            # RoPE on the query and key heads together, in [B, L, heads, D] (cos/sin broadcast over heads).
            qk = _apply_rope(qkv[..., : (H + Hkv) * D].unflatten(-1, (H + Hkv, D)), cos, sin)
            q, k = qk[:, :, :H], qk[:, :, H:].transpose(1, 2)  # [B, L, H, D], [B, Hkv, L, D]
            v = qkv[..., (H + Hkv) * D :].unflatten(-1, (Hkv, D)).transpose(1, 2)
            if cache is not None:
                cache.k[i, :, :, cache_start:S] = k
                cache.v[i, :, :, cache_start:S] = v
                k, v = cache.k[i, :, :, :S], cache.v[i, :, :, :S]
            if decode_step:
                a = _decode_attention(q, k, v, bias)
            else:
                a = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=H != Hkv
                )
                a = a.transpose(1, 2).reshape(B, L, H * D)
            x = x + F.linear(a, p[pre + "self_attn.o_proj.weight"])
            h = _rms_norm(x, p[pre + "post_attention_layernorm.weight"], c.rms_norm_eps)
            g, u = F.linear(h, self.fused[pre + "gate_up.weight"]).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, p[pre + "mlp.down_proj.weight"])
        return _rms_norm(x, p["model.norm.weight"], c.rms_norm_eps)

    def lm_head_weight(self) -> torch.Tensor:
        """[vocab_size, hidden]: the output projection (the embedding when tied)."""
        p = self.params
        return p["model.embed_tokens.weight"] if self.cfg.tie_word_embeddings else p["lm_head.weight"]

    def logits(self, hidden: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """fp32 logits over the first ``vocab_size`` rows (the tokenizer's vocabulary). [..., H] -> [..., V]."""
        w = self.lm_head_weight()
        if vocab_size is not None:
            w = w[:vocab_size]
        return F.linear(hidden, w).float()
