"""Layout facts of HF <-> Megatron conversion: QKV interleave per query group, gate/up fusion, vocabulary
padding, and how tensor-parallel shards of each are cut. All comparisons are exact (pure data movement)."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.model.hf_conversion import tensors as T


def _head_tagged(num_heads: int, head_dim: int, hidden: int, offset: float) -> torch.Tensor:
    """[num_heads * head_dim, hidden] whose rows of head h all equal offset + h (so rows name their head)."""
    tags = offset + torch.arange(num_heads, dtype=torch.float32).repeat_interleave(head_dim)
    return tags[:, None].expand(-1, hidden).clone()


@pytest.mark.parametrize("nh, ng, hd", [(4, 2, 3), (6, 3, 2), (4, 4, 5), (8, 1, 2)])
def test_interleave_qkv_groups_q_heads_then_k_then_v(nh: int, ng: int, hd: int) -> None:
    q, k, v = _head_tagged(nh, hd, 5, 0), _head_tagged(ng, hd, 5, 100), _head_tagged(ng, hd, 5, 200)
    qkv = T.interleave_qkv(q, k, v, num_heads=nh, num_query_groups=ng)
    assert qkv.shape == ((nh + 2 * ng) * hd, 5)
    per = nh // ng
    expected = []
    for g in range(ng):  # Megatron: view(ng, (per + 2) * hd) -> [per q heads, k head, v head]
        expected += [h for h in range(g * per, (g + 1) * per)] + [100 + g, 200 + g]
    got = qkv[::hd, 0].tolist()
    assert got == [float(e) for e in expected]
    q2, k2, v2 = T.split_qkv(qkv, num_heads=nh, num_query_groups=ng)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_interleave_qkv_bias_roundtrip_and_shape_errors() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(12, generator=g), torch.randn(6, generator=g), torch.randn(6, generator=g)
    qkv = T.interleave_qkv(q, k, v, num_heads=4, num_query_groups=2)
    assert all(
        torch.equal(a, b) for a, b in zip(T.split_qkv(qkv, num_heads=4, num_query_groups=2), (q, k, v))
    )
    with pytest.raises(ValueError, match="do not fit"):
        T.interleave_qkv(q, k[:3], v, num_heads=4, num_query_groups=2)
    with pytest.raises(ValueError, match="not a multiple"):
        T.interleave_qkv(q, k, v, num_heads=4, num_query_groups=3)


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_shard_of_interleaved_qkv_holds_whole_groups(tp: int) -> None:
    """Rank r's contiguous slice of linear_qkv is the interleave of that rank's own q heads and kv heads."""
    nh, ng, hd, hidden = 4, 2, 3, 5
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n * hd, hidden, generator=g) for n in (nh, ng, ng))
    full = T.interleave_qkv(q, k, v, num_heads=nh, num_query_groups=ng)
    shards = [T.split_tp_shard(full, rank=r, size=tp, dim=0) for r in range(tp)]
    for r, shard in enumerate(shards):
        qs, ks, vs = (torch.chunk(t, tp, dim=0)[r] for t in (q, k, v))
        assert torch.equal(shard, T.interleave_qkv(qs, ks, vs, num_heads=nh // tp, num_query_groups=ng // tp))
    assert torch.equal(T.merge_tp_shards(shards, dim=0), full)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gate_up_fusion_and_its_tp_layout(tp: int) -> None:
    g = torch.Generator().manual_seed(2)
    gate, up = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    fc1 = T.fuse_gate_up(gate, up)
    assert torch.equal(fc1[:8], gate) and torch.equal(fc1[8:], up)
    assert all(torch.equal(a, b) for a, b in zip(T.split_gate_up(fc1), (gate, up)))
    shards = [T.split_tp_shard(fc1, rank=r, size=tp, dim=0, layout="gate_up") for r in range(tp)]
    for r, shard in enumerate(shards):  # each rank holds [gate_r; up_r], not a plain slice of fc1
        assert torch.equal(shard, torch.cat([torch.chunk(gate, tp)[r], torch.chunk(up, tp)[r]]))
    assert torch.equal(T.merge_tp_shards(shards, dim=0, layout="gate_up"), fc1)


def test_row_parallel_split_along_dim_1() -> None:
    full = torch.arange(24.0).reshape(3, 8)
    shards = [T.split_tp_shard(full, rank=r, size=2, dim=1) for r in range(2)]
    assert torch.equal(shards[1], full[:, 4:])
    assert torch.equal(T.merge_tp_shards(shards, dim=1), full)
    with pytest.raises(ValueError, match="not divisible"):
        T.split_tp_shard(full, rank=0, size=3, dim=1)


def test_vocab_padding_is_zero_and_round_trips() -> None:
    w = torch.randn(10, 4)
    padded = T.pad_vocab(w, 16)
    assert padded.shape == (16, 4) and torch.equal(padded[:10], w) and not padded[10:].any()
    assert torch.equal(T.unpad_vocab(padded, 10), w)
    assert T.pad_vocab(w, 10) is w
    with pytest.raises(ValueError, match="smaller"):
        T.pad_vocab(w, 8)
    with pytest.raises(ValueError, match="fewer"):
        T.unpad_vocab(w, 11)
