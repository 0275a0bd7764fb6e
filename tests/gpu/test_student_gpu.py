"""The student on a GPU (skipped without CUDA): NCCL start-up, the TE layer spec when transformer_engine
imports, bf16 params with fp32 main params in the optimizer, and a few OPD steps that lower the loss on a
fixed batch."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.usefixtures("own_process_group"),
]


def test_bf16_student_steps_on_gpu() -> None:
    from megatron_opd.algorithms.horizon import HorizonWindow
    from megatron_opd.config.tree import LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
    from megatron_opd.model.builders import build_model_chunks, use_transformer_engine
    from megatron_opd.parallel.state import initialize_parallel
    from megatron_opd.training.batch import OPDBatch
    from megatron_opd.training.optimizer import setup_training
    from megatron_opd.training.step import TrainStep

    info = initialize_parallel(ParallelConfig(), seed=0)
    assert info.backend == "nccl" and info.device.type == "cuda"
    cfg = ModelConfig(
        vocab_size=256, num_layers=2, hidden_size=128, ffn_hidden_size=256, params_dtype="bfloat16"
    )
    chunks = build_model_chunks(cfg)
    assert next(chunks[0].parameters()).dtype == torch.bfloat16 and next(chunks[0].parameters()).is_cuda
    keys = chunks[0].state_dict().keys()
    if use_transformer_engine(cfg):  # TE fuses the pre-attention norm into linear_qkv
        assert any(k.endswith("linear_qkv.layer_norm_weight") for k in keys)
    else:
        assert any(k.endswith("input_layernorm.weight") for k in keys)
    objs = setup_training(chunks, OptimizerConfig(lr=1e-3), total_steps=10)
    step = TrainStep(objs.model, objs.optimizer, objs.scheduler, LossConfig(impl="reference"), vocab_size=256)
    g = torch.Generator().manual_seed(0)
    resps = torch.randint(0, 256, (8, 16), generator=g).tolist()
    batch = OPDBatch.from_lists([[1, 2, 3, 4]] * 8, resps, [[-0.5] * 16] * 8, HorizonWindow(0, 16, 16))
    results = [step(batch.split(2)) for _ in range(4)]
    assert all(not r.skipped and math.isfinite(r.loss) and math.isfinite(r.grad_norm) for r in results)
    # The log-ratio r = log p_teacher - log p_student shrinks as the student moves toward the teacher's
    # (constant) logprobs on these tokens: a real update happened in bf16 with fp32 main params.
    assert results[-1].log_ratio_mean < results[0].log_ratio_mean
    (lp,) = step.compute_logprobs([batch])
    assert lp.shape == (8, 16) and torch.isfinite(lp).all() and (lp <= 0).all()
