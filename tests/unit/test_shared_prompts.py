"""Shared-prompt packing (``model/shared_prompts.py``): the packed rows hold every sequence's tokens at its own
positions, and the step on packed rows gives the unpacked step's logprobs, loss, gradient norm and update.

Tolerances: fp32. Packing changes the shapes of the matmuls (fewer rows) and the order of the gradient sums over a
shared prompt's repeated keys and values, so values agree to fp32 rounding: logprobs to 1e-5, the loss to rel
1e-5, the gradient norm to rel 1e-4, and the weights after one Adam step to 1e-5 (1% of lr; Adam moves each weight
by about lr * sign(grad))."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.config.tree import LossConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_opd.model.builders import build_model_chunks
from megatron_opd.model.shared_prompts import pack_shared_prompts, prompt_groups
from megatron_opd.parallel.state import initialize_parallel
from megatron_opd.training.batch import OPDBatch
from megatron_opd.training.optimizer import setup_training
from megatron_opd.training.step import TrainStep

# This module may start a one-process group in the pytest process (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("own_process_group")

VOCAB = 100
MODEL = ModelConfig(vocab_size=VOCAB, num_layers=2, hidden_size=32, ffn_hidden_size=64)
WINDOW = HorizonWindow(0, 9, 12)


def _grouped_batch(seed: int = 0, prompts: int = 3, n: int = 4, window=WINDOW) -> OPDBatch:
    """``prompts`` prompts of different lengths, each with ``n`` responses of different lengths, in groups."""
    g = torch.Generator().manual_seed(seed)
    ps, rs = [], []
    for _ in range(prompts):
        p = torch.randint(0, VOCAB, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n):
            ps.append(p)
            rs.append(
                torch.randint(0, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            )
    teacher = [(-3 * torch.rand(len(r), generator=g)).tolist() for r in rs]
    return OPDBatch.from_lists(ps, rs, teacher, window)


def test_packed_rows_hold_every_token_at_its_own_position() -> None:
    batch = _grouped_batch(prompts=3, n=4)
    lengths = batch.prompt_lengths + batch.response_lengths
    packed = pack_shared_prompts(batch.tokens, batch.prompt_lengths, lengths, multiple=4)
    assert packed is not None
    G, L = packed.tokens.shape
    assert G == 3 and L % 4 == 0
    widths = [
        int(batch.prompt_lengths[m[0]] + batch.response_lengths[m].sum())
        for m in prompt_groups(batch.tokens, batch.prompt_lengths)
    ]
    assert L == -(-max(widths) // 4) * 4  # the prompt once, then every response
    for b in range(batch.size):
        t = torch.arange(int(lengths[b]))
        row, col = packed.locate(torch.full_like(t, b), t)
        assert torch.equal(packed.tokens[row, col], batch.tokens[b, : len(t)])
        assert torch.equal(packed.layout.positions[row, col], t)
        # the unpack index reads the same packed tokens, and the pack index sends each one back to a real token
        flat = packed.layout.unpack.view(batch.size, -1)[b, : len(t)]
        assert torch.equal(flat, row * L + col)
    back = packed.layout.pack.view(G, L)
    for g in range(G):
        src = back[g] // batch.tokens.shape[1], back[g] % batch.tokens.shape[1]
        width = widths[g]
        assert torch.equal(batch.tokens[src[0][:width], src[1][:width]], packed.tokens[g, :width])


def test_nothing_to_share_keeps_the_batch() -> None:
    batch = _grouped_batch(prompts=4, n=1)
    lengths = batch.prompt_lengths + batch.response_lengths
    assert pack_shared_prompts(batch.tokens, batch.prompt_lengths, lengths) is None


def _step(share: bool, seed: int = 5, loss: LossConfig | None = None):
    initialize_parallel(ParallelConfig(), seed=seed)
    chunks = build_model_chunks(MODEL)
    objs = setup_training(chunks, OptimizerConfig(lr=1e-3), total_steps=20)
    step = TrainStep(
        objs.model,
        objs.optimizer,
        objs.scheduler,
        loss or LossConfig(),
        vocab_size=VOCAB,
        share_prompts=share,
    )
    return chunks, step


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_the_packed_step_is_the_unpacked_step(impl: str) -> None:
    batch = _grouped_batch(prompts=3, n=4, window=HorizonWindow(1, 8, 12))
    loss = dataclasses.replace(LossConfig(), impl=impl)
    out = {}
    for share in (False, True):
        chunks, step = _step(share, loss=loss)
        logp = step.compute_logprobs(batch.split(2))
        result = step(batch.split(2))
        out[share] = (logp, result, {k: v.detach().clone() for k, v in chunks[0].named_parameters()})
    for a, b in zip(out[False][0], out[True][0]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    ref, got = out[False][1], out[True][1]
    assert got.loss == pytest.approx(ref.loss, rel=1e-5)
    assert got.grad_norm == pytest.approx(ref.grad_norm, rel=1e-4)
    assert got.num_tokens == ref.num_tokens == batch.num_distilled_tokens()
    for k, v in out[False][2].items():
        torch.testing.assert_close(out[True][2][k], v, rtol=0, atol=1e-5, msg=k)


def test_attention_that_cannot_read_the_layout_is_refused() -> None:
    """Megatron's own DotProductAttention (or Transformer-Engine's) would take the layout for a mask: the step
    says which setting to change instead of computing something else."""
    initialize_parallel(ParallelConfig(), seed=1)
    chunks = build_model_chunks(dataclasses.replace(MODEL, local_attention="megatron"))
    objs = setup_training(chunks, OptimizerConfig(lr=1e-3), total_steps=2)
    with pytest.raises(
        ValueError, match="train.share_prompts needs the SDPA core attention.*set train.share_prompts false"
    ):
        TrainStep(
            objs.model, objs.optimizer, objs.scheduler, LossConfig(), vocab_size=VOCAB, share_prompts=True
        )
