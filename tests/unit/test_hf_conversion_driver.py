"""HF -> Megatron (torch_dist) -> HF on tiny Qwen2 and Llama models, in one process at TP=1/PP=1.

Checks: the round trip is bit-identical; ``transformers`` loads the export and gives the same logits and greedy
tokens; the converted Megatron model's logits equal the HF model's (the "Megatron Qwen2 logits == HF logits"
test); and failures (missing files, bad shapes, an existing output) raise clearly and leave no output behind.
The TP=2/PP=2 load of the same checkpoints is in ``tests/distributed/test_hf_conversion_tp2_pp2.py``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from megatron_opd.model.builders import build_model
from megatron_opd.model.hf_conversion import ConversionError, hf_to_megatron, megatron_to_hf
from megatron_opd.model.hf_conversion.driver import read_metadata, single_process_megatron
from megatron_opd.model.hf_conversion.hf_files import HFCheckpointReader

SIZES = dict(
    vocab_size=100,  # padded to 112 in Megatron (make_vocab_size_divisible_by=16)
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
DIVISIBLE_BY = 16
# fp32 throughout; Megatron and HF compute attention and RoPE with different op orders, so logits agree to
# rounding (measured max 2e-7 Qwen2, 4e-7 Llama on 4x64 tokens), well inside the 1e-4.
ATOL = 1e-4


def make_tiny_hf(kind: str, out: Path) -> torch.nn.Module:
    """A random-init tiny model saved as HF would: Qwen2 untied and sharded (with an index), Llama tied, 1 file."""
    torch.manual_seed(0 if kind == "qwen2" else 1)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False, rope_theta=1e6))
        model.save_pretrained(out, max_shard_size="60KB")
    else:
        model = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=True, rope_theta=5e5))
        model.save_pretrained(out)
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return model.eval()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def converted(request, tmp_path_factory):
    """(kind, HF model, HF dir, Megatron checkpoint dir, exported HF dir) for each architecture."""
    root = tmp_path_factory.mktemp(request.param)
    model = make_tiny_hf(request.param, root / "hf")
    hf_to_megatron(root / "hf", root / "mcore", make_vocab_size_divisible_by=DIVISIBLE_BY, progress=False)
    megatron_to_hf(root / "mcore", root / "hf_out", progress=False)
    return request.param, model, root / "hf", root / "mcore", root / "hf_out"


def test_round_trip_is_bit_identical(converted) -> None:
    kind, _, hf_dir, mcore, hf_out = converted
    src, out = HFCheckpointReader(hf_dir), HFCheckpointReader(hf_out)
    assert sorted(src.names()) == sorted(out.names())
    for name in src.names():
        a, b = src.get(name), out.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (hf_out / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()
    assert (hf_out / "generation_config.json").is_file()
    assert json.loads((hf_out / "config.json").read_text()) == json.loads(
        (hf_dir / "config.json").read_text()
    )
    assert read_metadata(mcore).architecture == kind
    if kind == "qwen2":
        assert (hf_dir / "model.safetensors.index.json").is_file()  # the sharded-input path was exercised


def test_exported_model_gives_same_logits_and_greedy_tokens(converted) -> None:
    _, model, _, _, hf_out = converted
    exported = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()
    prompt = torch.tensor([[3, 17, 42, 5, 99, 0, 64]])
    with torch.no_grad():
        diff = (exported(prompt).logits - model(prompt).logits).abs().max().item()
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        tokens_a, tokens_b = model.generate(prompt, **kw), exported.generate(prompt, **kw)
    assert diff <= ATOL
    assert torch.equal(tokens_a, tokens_b)


def test_megatron_logits_match_hf_logits(converted) -> None:
    """Issue 3's 'Megatron Qwen2 logits == HF logits' (and Llama's), through the converted checkpoint."""
    from megatron.core import dist_checkpointing

    _, model, _, mcore, _ = converted
    cfg = read_metadata(mcore)
    tokens = torch.tensor([[3, 17, 42, 5, 99, 0, 64, 8, 8, 1], [7, 7, 2, 90, 11, 4, 4, 31, 63, 2]])
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with single_process_megatron():
        megatron = build_model(cfg).eval()
        loaded = dist_checkpointing.load({"model": megatron.sharded_state_dict()}, str(mcore))
        megatron.load_state_dict(loaded["model"])
        with torch.no_grad():
            logits = megatron(tokens, positions, None)
            expected = model(tokens).logits
    assert logits.shape == (2, 10, 112)
    assert (logits[..., : cfg.vocab_size] - expected).abs().max().item() <= ATOL
    # Zero padding rows give logit 0 exactly; consumers slice to vocab_size so these ids are never sampled.
    assert not logits[..., cfg.vocab_size :].any()


def test_failures_are_clear_and_leave_no_output(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist|no config.json"):
        hf_to_megatron(tmp_path / "nowhere", tmp_path / "out", progress=False)
    hf = tmp_path / "hf"
    make_tiny_hf("llama", hf)
    broken = tmp_path / "broken"
    shutil.copytree(hf, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json or model.safetensors"):
        hf_to_megatron(broken, tmp_path / "out", progress=False)
    config = json.loads((hf / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, intermediate_size=160)))
    shutil.copy(hf / "model.safetensors", broken / "model.safetensors")
    with pytest.raises(ConversionError, match=r"gate_proj.weight has shape \(176, 64\).*implies \(160, 64\)"):
        hf_to_megatron(broken, tmp_path / "out", progress=False)
    (broken / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1)))
    with pytest.raises(ConversionError, match="tensors the config does not account for"):
        hf_to_megatron(broken, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "hf"]  # nothing partial was left behind
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="not a dist_checkpointing checkpoint"):
        megatron_to_hf(tmp_path / "out", tmp_path / "hf_out", progress=False)
    with pytest.raises(ConversionError, match="tensor-parallel size 3 does not divide num_attention_heads"):
        hf_to_megatron(hf, tmp_path / "out2", target_tp=3, progress=False)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[2] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_tools_round_trip_bf16(tmp_path) -> None:
    """The two thin tools, run in-process, on a bf16 checkpoint (as the paper's models are): the dtype is kept
    by default (bf16 Megatron params, bf16 export) and the round trip is exact."""
    hf_dir = tmp_path / "hf"
    make_tiny_hf("llama", hf_dir).to(torch.bfloat16).save_pretrained(hf_dir)
    _tool("convert_hf_to_megatron").main(
        [
            "--hf-dir",
            str(hf_dir),
            "--out",
            str(tmp_path / "m"),
            "--make-vocab-size-divisible-by",
            "32",
            "--no-progress",
        ]
    )
    assert read_metadata(tmp_path / "m").params_dtype == "bfloat16"
    _tool("convert_megatron_to_hf").main(
        ["--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "h"), "--no-progress"]
    )
    src, out = HFCheckpointReader(hf_dir), HFCheckpointReader(tmp_path / "h")
    assert sorted(src.names()) == sorted(out.names())
    assert all(
        src.get(n).dtype == torch.bfloat16 and torch.equal(src.get(n), out.get(n)) for n in src.names()
    )
