"""The tensor rearrangements between Hugging Face and Megatron weight layouts, in one place.

Why it exists: HF keeps Q, K, V and the SwiGLU gate/up projections as separate matrices and stores the embedding
with exactly ``vocab_size`` rows; Megatron fuses them (``linear_qkv``, ``linear_fc1``), interleaves the QKV rows per
query group so each tensor-parallel rank owns whole groups, and pads the vocabulary. Every direction of conversion
(files on disk, the live model's weight sync, loading HF weights into a sharded model) goes through these few
pure functions, so each layout fact is written once and tested once.

Megatron's QKV layout (``SelfAttention.get_query_key_value_tensors``): the rows of ``linear_qkv.weight`` are viewed
as ``[num_query_groups, (heads_per_group + 2) * head_dim]``; inside each group come ``heads_per_group`` query heads,
then that group's key head, then its value head. A tensor-parallel rank holds ``num_query_groups / tp`` consecutive
groups, so concatenating the ranks' shards along dim 0 gives back the full interleaved tensor.

Megatron's SwiGLU ``linear_fc1.weight`` is ``cat([gate, up], dim=0)`` on every rank *for that rank's slice*: rank r
holds ``[gate_r; up_r]``, so the TP shards are not a plain split of the full tensor (``merge_tp_shards`` and
``split_tp_shard`` handle this).
"""

from __future__ import annotations

from typing import Literal

import torch

TPLayout = Literal["plain", "gate_up"]
"""How a tensor-parallel-sharded Megatron tensor is cut: 'plain' (a contiguous split along ``partition_dim``) or
'gate_up' (each rank holds its gate slice stacked on its up slice, as ``linear_fc1`` does)."""


def interleave_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int, num_query_groups: int
) -> torch.Tensor:
    """Fuse HF ``q_proj``, ``k_proj``, ``v_proj`` into Megatron's ``linear_qkv`` (weights or biases).

    Args:
        q: ``[num_heads * head_dim, *rest]`` (``rest`` is ``[hidden]`` for weights, empty for biases).
        k, v: ``[num_query_groups * head_dim, *rest]``.
    Returns:
        ``[(num_heads + 2 * num_query_groups) * head_dim, *rest]``, rows grouped per query group as
        ``[q heads of the group, k head, v head]``.
    """
    if num_heads % num_query_groups:
        raise ValueError(
            f"num_heads ({num_heads}) is not a multiple of num_query_groups ({num_query_groups})"
        )
    head_dim = q.shape[0] // num_heads
    rest = tuple(q.shape[1:])
    expect_q = (num_heads * head_dim, *rest)
    expect_kv = (num_query_groups * head_dim, *rest)
    if tuple(q.shape) != expect_q or tuple(k.shape) != expect_kv or tuple(v.shape) != expect_kv:
        raise ValueError(
            f"QKV shapes q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)} do not fit num_heads={num_heads}, "
            f"num_query_groups={num_query_groups}, head_dim={head_dim} (expected q={expect_q}, k=v={expect_kv})"
        )
    per_group = num_heads // num_query_groups
    qg = q.reshape(num_query_groups, per_group * head_dim, *rest)
    kg = k.reshape(num_query_groups, head_dim, *rest)
    vg = v.reshape(num_query_groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((num_heads + 2 * num_query_groups) * head_dim, *rest)


def split_qkv(
    qkv: torch.Tensor, *, num_heads: int, num_query_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``interleave_qkv``: Megatron ``linear_qkv`` ``[(nh + 2 ng) * hd, *rest]`` -> HF (q, k, v)."""
    rows = qkv.shape[0]
    denom = num_heads + 2 * num_query_groups
    if num_heads % num_query_groups or rows % denom:
        raise ValueError(
            f"linear_qkv with {rows} rows does not fit num_heads={num_heads}, num_query_groups={num_query_groups}"
        )
    head_dim = rows // denom
    rest = tuple(qkv.shape[1:])
    per_group = num_heads // num_query_groups
    grouped = qkv.reshape(num_query_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(num_heads * head_dim, *rest).contiguous(),
        k.reshape(num_query_groups * head_dim, *rest).contiguous(),
        v.reshape(num_query_groups * head_dim, *rest).contiguous(),
    )


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF ``gate_proj`` ``[ffn, hidden]`` and ``up_proj`` ``[ffn, hidden]`` -> Megatron ``linear_fc1`` ``[2 ffn, hidden]``."""
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_gate_up``: ``[2 ffn, hidden]`` -> (gate ``[ffn, hidden]``, up ``[ffn, hidden]``)."""
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has an odd number of rows ({fc1.shape[0]}); expected [gate; up]")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """HF embedding / LM head ``[vocab, hidden]`` -> Megatron's ``[padded_rows, hidden]``; new rows are zero.

    Zero rows give a logit of exactly 0 for every padded id; consumers slice logits to the HF vocabulary
    (``logits[..., :vocab_size]``) so these ids are never sampled.
    """
    rows = weight.shape[0]
    if padded_rows < rows:
        raise ValueError(f"padded vocabulary ({padded_rows}) is smaller than the checkpoint's ({rows} rows)")
    if padded_rows == rows:
        return weight
    out = weight.new_zeros((padded_rows, *weight.shape[1:]))
    out[:rows].copy_(weight)
    return out


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Megatron ``[padded, hidden]`` -> HF ``[vocab_size, hidden]`` (drops the padding rows)."""
    if weight.shape[0] < vocab_size:
        raise ValueError(f"embedding has {weight.shape[0]} rows, fewer than the vocabulary size {vocab_size}")
    return weight[:vocab_size]


def merge_tp_shards(shards: list[torch.Tensor], *, dim: int, layout: TPLayout = "plain") -> torch.Tensor:
    """Rebuild a full Megatron tensor from its tensor-parallel shards (rank order).

    Args:
        shards: ``tp`` tensors, each the local shard of one rank.
        dim: the partition dimension (Megatron's ``param.partition_dim``).
        layout: 'gate_up' for ``linear_fc1`` (each shard is ``[gate_r; up_r]`` along dim 0).
    """
    if len(shards) == 1:
        return shards[0]
    if layout == "gate_up":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def split_tp_shard(
    full: torch.Tensor, *, rank: int, size: int, dim: int, layout: TPLayout = "plain"
) -> torch.Tensor:
    """The shard of ``full`` that tensor-parallel rank ``rank`` of ``size`` holds (inverse of ``merge_tp_shards``)."""
    if size == 1:
        return full
    if layout == "gate_up":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0)
    if full.shape[dim] % size:
        raise ValueError(
            f"dimension {dim} of size {full.shape[dim]} is not divisible by tensor-parallel size {size}"
        )
    return torch.chunk(full, size, dim=dim)[rank].contiguous()
