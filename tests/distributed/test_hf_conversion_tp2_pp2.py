"""HF -> Megatron (torch_dist) -> loaded at TP=2, PP=2 on 4 gloo ranks -> HF, bit-identical, Qwen2 and Llama.

One 4-rank launch covers both models (process start-up is the cost). On each rank the converted checkpoint is
loaded into the sharded model (vocabulary re-padded from 112 to 128 rows by dist_checkpointing); then
- ``iter_hf_weights`` over the TP group yields, per pipeline stage, HF tensors equal to the original files;
- ``load_hf_weights`` straight from the HF directory gives the same sharded parameters as the checkpoint load;
- the sharded model is saved again (a TP=2/PP=2 torch_dist checkpoint) and ``megatron_to_hf`` of that equals
  the original HF checkpoint;
- with 2 virtual pipeline stages (a 4-layer model), each chunk yields its layers under their global indices.
All comparisons are exact: conversion only moves data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_opd.utils.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

SIZES = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
BUCKET_BYTES = 48 * 1024


def _worker(rank: int, world: int, cases: list[tuple[str, str, str]], vpp_case: tuple[str, str]) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu

    from megatron_opd.config.tree import ParallelConfig
    from megatron_opd.model.builders import build_model_chunks, model_config_from_hf
    from megatron_opd.model.hf_conversion import iter_hf_weight_buckets, iter_hf_weights, load_hf_weights
    from megatron_opd.model.hf_conversion.driver import read_metadata
    from megatron_opd.parallel.state import initialize_parallel

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), seed=0)
    tp_group = mpu.get_tensor_model_parallel_group()
    out = {"tp_rank": mpu.get_tensor_model_parallel_rank(), "pp_rank": mpu.get_pipeline_model_parallel_rank()}
    for kind, hf_dir, mcore in cases:
        cfg = read_metadata(mcore)
        chunks = build_model_chunks(cfg)
        loaded = dist_checkpointing.load({"model": chunks[0].sharded_state_dict()}, mcore)
        chunks[0].load_state_dict(loaded["model"])
        weights = {n: t.clone() for n, t in iter_hf_weights(chunks, cfg, tp_group=tp_group)}
        buckets = [
            [(n, t.numel() * t.element_size()) for n, t in b]
            for b in iter_hf_weight_buckets(chunks, cfg, tp_group=tp_group, bucket_bytes=BUCKET_BYTES)
        ]
        fresh = build_model_chunks(cfg)
        load_hf_weights(fresh, hf_dir, cfg, tp_group=tp_group)
        params = dict(chunks[0].named_parameters())
        direct_equal = {n: torch.equal(p, params[n]) for n, p in fresh[0].named_parameters()}
        resaved = os.path.join(os.path.dirname(mcore), "resaved_tp2_pp2")
        if rank == 0:
            os.makedirs(resaved, exist_ok=True)
        dist.barrier()
        # Nested as the trainer's checkpoints are (training/checkpoint.py): the tensor keys do not change.
        dist_checkpointing.save({"model": {"chunk0": chunks[0].sharded_state_dict()}}, resaved)
        emb = params.get("embedding.word_embeddings.weight")
        out[kind] = {
            "weights": weights,
            "buckets": buckets,
            "direct_equal": direct_equal,
            "embedding_rows": None if emb is None else emb.shape[0],
        }
    # Interleaved pipeline (TP=2, PP=2, 2 virtual stages) on a 4-layer model loaded straight from HF: stage p,
    # chunk v holds global layer 2v + p; the iterated names must carry those global indices.
    kind, hf4 = vpp_case
    initialize_parallel(
        ParallelConfig(
            tensor_model_parallel_size=2,
            pipeline_model_parallel_size=2,
            virtual_pipeline_model_parallel_size=2,
        ),
        seed=0,
    )
    cfg = model_config_from_hf(hf4, make_vocab_size_divisible_by=16)
    chunks = build_model_chunks(cfg)
    load_hf_weights(chunks, hf4, cfg, tp_group=mpu.get_tensor_model_parallel_group())
    out["vpp"] = {
        n: t.clone() for n, t in iter_hf_weights(chunks, cfg, tp_group=mpu.get_tensor_model_parallel_group())
    }
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from megatron_opd.model.hf_conversion import hf_to_megatron

    root = tmp_path_factory.mktemp("tp2pp2")
    cases = []
    for kind in ("qwen2", "llama"):
        torch.manual_seed(5)
        if kind == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False, rope_theta=1e6))
        else:
            model = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=True))
        model.save_pretrained(root / kind / "hf", max_shard_size="60KB")
        hf_to_megatron(
            root / kind / "hf", root / kind / "mcore", make_vocab_size_divisible_by=16, progress=False
        )
        cases.append((kind, str(root / kind / "hf"), str(root / kind / "mcore")))
    torch.manual_seed(6)
    Qwen2ForCausalLM(
        Qwen2Config(**dict(SIZES, num_hidden_layers=4), tie_word_embeddings=True)
    ).save_pretrained(root / "qwen2_4_layers" / "hf")
    vpp_case = ("qwen2_4_layers", str(root / "qwen2_4_layers" / "hf"))
    return root, run_on_ranks(_worker, 4, cases, vpp_case)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_sharded_model_yields_the_original_hf_tensors(kind: str, results) -> None:
    from megatron_opd.model.hf_conversion.hf_files import HFCheckpointReader

    root, ranks = results
    original = HFCheckpointReader(root / kind / "hf")
    by_stage: dict[int, list[dict]] = {}
    for r in ranks:
        by_stage.setdefault(r["pp_rank"], []).append(r[kind]["weights"])
    union = {}
    for _, tp_copies in sorted(by_stage.items()):
        assert len(tp_copies) == 2 and tp_copies[0].keys() == tp_copies[1].keys()
        assert all(torch.equal(tp_copies[0][n], tp_copies[1][n]) for n in tp_copies[0])  # gathered alike
        assert not union.keys() & tp_copies[0].keys(), "stages yield disjoint tensors"
        union.update(tp_copies[0])
    assert "model.layers.1.mlp.gate_proj.weight" in by_stage[1][0]  # global layer index on the second stage
    assert sorted(union) == sorted(original.names())
    for name in original.names():
        assert torch.equal(union[name], original.get(name)), name
    for r in ranks:
        sizes = [sum(b for _, b in bucket) for bucket in r[kind]["buckets"]]
        assert all(s <= BUCKET_BYTES or len(bucket) == 1 for s, bucket in zip(sizes, r[kind]["buckets"]))
        assert [n for bucket in r[kind]["buckets"] for n, _ in bucket] == list(r[kind]["weights"])


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_direct_hf_load_equals_checkpoint_load(kind: str, results) -> None:
    _, ranks = results
    for r in ranks:
        assert r[kind]["direct_equal"] and all(r[kind]["direct_equal"].values())
        if r["pp_rank"] == 0:
            assert r[kind]["embedding_rows"] == 64  # 100 rows padded to 128 at TP=2, 64 per rank


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_tp2_pp2_checkpoint_exports_to_the_original(kind: str, results) -> None:
    from megatron_opd.model.hf_conversion import megatron_to_hf
    from megatron_opd.model.hf_conversion.hf_files import HFCheckpointReader

    root, _ = results
    out = root / kind / "hf_from_tp2_pp2"
    megatron_to_hf(root / kind / "resaved_tp2_pp2", out, hf_config_dir=root / kind / "hf", progress=False)
    original, exported = HFCheckpointReader(root / kind / "hf"), HFCheckpointReader(out)
    assert sorted(original.names()) == sorted(exported.names())
    for name in original.names():
        assert torch.equal(original.get(name), exported.get(name)), name
    assert json.loads((Path(out) / "config.json").read_text())["vocab_size"] == 100


def test_virtual_pipeline_chunks_yield_global_layer_names(results) -> None:
    from megatron_opd.model.hf_conversion.hf_files import HFCheckpointReader

    root, ranks = results
    original = HFCheckpointReader(root / "qwen2_4_layers" / "hf")
    union: dict[str, torch.Tensor] = {}
    for r in ranks:
        layers = {int(n.split(".")[2]) for n in r["vpp"] if n.startswith("model.layers.")}
        assert layers == {r["pp_rank"], r["pp_rank"] + 2}  # chunk v of stage p holds layer 2v + p
        union.update(r["vpp"])
    assert sorted(union) == sorted(original.names())  # tied: no lm_head, the embedding comes from stage 0
    for name in original.names():
        assert torch.equal(union[name], original.get(name)), name
