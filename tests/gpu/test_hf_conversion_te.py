"""HF <-> Megatron with the Transformer-Engine layer spec on a GPU (skipped without CUDA and transformer_engine).

The TE spec fuses the norms into the next linear layer (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``); the rules resolve those spellings. Checked: loading HF weights into the TE
model and iterating them back is exact, HF -> torch_dist -> HF is exact, and the TE model's logits match HF's.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("transformer_engine")

SIZES = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def test_transformer_engine_spec_round_trip_and_logits(tmp_path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_opd.model.builders import build_model
    from megatron_opd.model.hf_conversion import (
        hf_to_megatron,
        iter_hf_weights,
        load_hf_weights,
        megatron_to_hf,
    )
    from megatron_opd.model.hf_conversion.driver import model_config_for_hf, single_process_megatron
    from megatron_opd.model.hf_conversion.hf_files import HFCheckpointReader

    torch.manual_seed(0)
    hf_model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False, rope_theta=1e6)).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    src = HFCheckpointReader(tmp_path / "hf")
    _, cfg = model_config_for_hf(
        tmp_path / "hf", transformer_impl="transformer_engine", params_dtype="float32"
    )
    with single_process_megatron():
        model = build_model(cfg).eval()
        assert any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in model.named_parameters())
        load_hf_weights([model], src, cfg)
        back = {n: t.cpu() for n, t in iter_hf_weights([model], cfg)}
        assert sorted(back) == sorted(src.names())
        assert all(torch.equal(back[n], src.get(n)) for n in src.names())
        torch.backends.cuda.matmul.allow_tf32 = False
        tokens = torch.tensor([[3, 17, 42, 5, 99, 0, 64, 8]])
        with torch.no_grad():
            logits = model(tokens.cuda(), torch.arange(8)[None].cuda(), None)[..., : cfg.vocab_size].cpu()
            expected = hf_model(tokens).logits
    # fp32 with TF32 off; TE's kernels order reductions differently from PyTorch's CPU ones: agreement to
    # rounding is expected, the 1e-4 bound is kept.
    assert (logits - expected).abs().max().item() <= 1e-4
    hf_to_megatron(tmp_path / "hf", tmp_path / "m", transformer_impl="transformer_engine", progress=False)
    megatron_to_hf(tmp_path / "m", tmp_path / "out", progress=False)
    out = HFCheckpointReader(tmp_path / "out")
    assert all(torch.equal(out.get(n), src.get(n)) for n in src.names())
