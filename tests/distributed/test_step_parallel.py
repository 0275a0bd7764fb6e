"""The student step and checkpoints across layouts, on 2 gloo processes (one launch, several layouts in turn).

Checked against one process running the whole batch (in the pytest process itself):
- TP=2 loss and gradients == TP=1; PP=2 (1F1B) and PP=2 x VPP=2 (interleaved) == PP=1; DP=2 with 2
  micro-batches per rank == 1 process with the whole batch as one micro-batch; the fused (chunked) LM-head
  loss at TP=2 == the reference path; TP=2 with shared prompts (each prompt's rollouts packed in one row,
  ``train.share_prompts``) on a batch of repeated prompts == 1 process unpacked.
- A checkpoint saved at TP=2 (after a step, with Adam state) loads at PP=2 and at TP=1 and gives the same loss
  and the same next update as TP=2 continuing.
- Tied embeddings (Llama style) at PP=2 follow DP=2 for 3 steps (the two copies of the shared weight stay equal).
- Stop after step k, resume (distributed optimizer with bf16 params, progressive horizon, data order in the trainer state):
  losses of steps k+1..k+3 equal the uninterrupted run's exactly.

Tolerances: all fp32. Changing the layout changes the order of floating-point sums (TP all-reduces partial
matmul sums, DP/micro-batching sums gradients in another order), so values agree to fp32 rounding, not bit for
bit: losses to rel 1e-5, gradients to rtol 1e-4 with atol 1e-6 (a few ulps of the largest gradient entries of
this tiny model, ~1e-2). Resume within one layout replays the same operations and is compared exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_opd.algorithms.horizon import HorizonWindow
from megatron_opd.utils.spawn import run_on_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("own_process_group")]

VOCAB = 100  # padded to 128 at TP=1 and 256 at TP=2: checkpoints must bridge the padding
SEED = 7


def _model_cfg(divisible_by: int = 128, tied: bool = False, bf16: bool = False):
    from megatron_opd.config.tree import ModelConfig

    return ModelConfig(
        architecture="llama" if tied else "qwen2",
        add_qkv_bias=not tied,
        untie_embeddings_and_output_weights=not tied,
        vocab_size=VOCAB,
        params_dtype="bfloat16" if bf16 else "float32",
        make_vocab_size_divisible_by=divisible_by,
        num_layers=4,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
    )


def _batch(seed: int, n: int = 8, window: HorizonWindow | None = None):
    from megatron_opd.training.batch import OPDBatch

    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, VOCAB, (int(k),), generator=g).tolist()
        for k in torch.randint(1, 5, (n,), generator=g)
    ]
    resps = [
        torch.randint(0, VOCAB, (int(k),), generator=g).tolist()
        for k in torch.randint(2, 10, (n,), generator=g)
    ]
    teacher = [(-3 * torch.rand(len(r), generator=g)).tolist() for r in resps]
    return OPDBatch.from_lists(prompts, resps, teacher, window or HorizonWindow(0, 7, 10))


def _grouped_batch(seed: int):
    """4 prompts x 2 rollouts each (different responses): the batch that shared prompts pack."""
    from megatron_opd.training.batch import OPDBatch

    g = torch.Generator().manual_seed(seed)
    prompts, resps = [], []
    for k in torch.randint(1, 5, (4,), generator=g):
        p = torch.randint(0, VOCAB, (int(k),), generator=g).tolist()
        for n in torch.randint(2, 10, (2,), generator=g):
            prompts.append(p)
            resps.append(torch.randint(0, VOCAB, (int(n),), generator=g).tolist())
    teacher = [(-3 * torch.rand(len(r), generator=g)).tolist() for r in resps]
    return OPDBatch.from_lists(prompts, resps, teacher, HorizonWindow(0, 7, 10))


def _setup(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    seed: int = SEED,
    distopt: bool = False,
    impl: str = "reference",
    divisible_by: int = 128,
    tied: bool = False,
    bf16: bool = False,
    total_steps: int = 20,
    share_prompts: bool = False,
):
    from megatron_opd.config.tree import LossConfig, OptimizerConfig, ParallelConfig
    from megatron_opd.model.builders import build_model_chunks
    from megatron_opd.parallel.state import initialize_parallel
    from megatron_opd.training.optimizer import setup_training
    from megatron_opd.training.step import TrainStep

    initialize_parallel(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=seed
    )
    chunks = build_model_chunks(_model_cfg(divisible_by, tied, bf16))
    opt = OptimizerConfig(
        lr=1e-3, use_distributed_optimizer=distopt, lr_warmup_steps=2, lr_decay_style="cosine"
    )
    objs = setup_training(chunks, opt, total_steps=total_steps)
    step = TrainStep(
        objs.model,
        objs.optimizer,
        objs.scheduler,
        LossConfig(gamma=0.5, impl=impl),
        vocab_size=VOCAB,
        share_prompts=share_prompts,
    )
    return chunks, objs, step


def _full_grads(chunks) -> dict[str, torch.Tensor]:
    """Every gradient in TP=1 form with global layer numbers (TP shards gathered, SwiGLU halves re-joined)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    tp, group = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_group()
    out = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            g = p.main_grad.detach().clone()
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(g) for _ in range(tp)]
                dist.all_gather(parts, g.contiguous(), group=group)
                if name.endswith("linear_fc1.weight"):  # each rank holds [gate_r; up_r]
                    halves = [x.chunk(2, dim=0) for x in parts]
                    g = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
                else:
                    g = torch.cat(parts, dim=p.partition_dim)
            if "word_embeddings" in name or "output_layer" in name:
                g = g[:VOCAB]  # padding rows differ in number between layouts (and get no gradient)
            if name.startswith("decoder.layers."):
                i = int(name.split(".")[2])
                global_i = (
                    chunk.decoder.layers[i].layer_number - 1
                )  # PP/VPP stages hold a slice of the layers
                name = name.replace(f"decoder.layers.{i}.", f"decoder.layers.{global_i}.", 1)
            out[name] = g
    return out


def _summary(result) -> dict:
    return {"loss": result.loss, "grad_norm": result.grad_norm, "skipped": result.skipped}


def _worker(rank: int, world: int, root: str) -> dict:
    from megatron.core import parallel_state as mpu

    from megatron_opd.algorithms.horizon import ProgressiveHorizon
    from megatron_opd.training import checkpoint as ckpt

    out: dict = {}
    batch, batch2 = _batch(1), _batch(2)

    # DP=2 (TP=1): each rank half of the batch as 2 micro-batches. Also writes the shared initial weights.
    chunks, objs, step = _setup()
    ckpt.save_checkpoint(
        os.path.join(root, "init"), 0, objs.model, objs.optimizer, objs.scheduler, {"step": 0}
    )
    res = step(batch.shard(mpu.get_data_parallel_rank(), 2).split(2))
    out["dp2"] = {**_summary(res), "grads": _full_grads(chunks)}

    # TP=2: whole batch, one micro-batch; then save (with Adam state) and take one more step on batch2.
    chunks, objs, step = _setup(tp=2, seed=99)
    ckpt.load_checkpoint(os.path.join(root, "init"), objs.model, objs.optimizer, objs.scheduler)
    res = step([batch])
    out["tp2"] = {**_summary(res), "grads": _full_grads(chunks)}
    ckpt.save_checkpoint(
        os.path.join(root, "tp2"), 1, objs.model, objs.optimizer, objs.scheduler, {"step": 1}
    )
    out["tp2_next"] = _summary(step([batch2]))

    # PP=2: whole batch as 2 micro-batches through the 1F1B schedule; then the TP=2 checkpoint at PP=2.
    chunks, objs, step = _setup(pp=2, seed=98)
    ckpt.load_checkpoint(os.path.join(root, "init"), objs.model, objs.optimizer, objs.scheduler)
    res = step(batch.split(2))
    out["pp2"] = {**_summary(res), "grads": _full_grads(chunks)}
    chunks, objs, step = _setup(pp=2, seed=97)
    ckpt.load_checkpoint(os.path.join(root, "tp2"), objs.model, objs.optimizer, objs.scheduler)
    out["pp2_from_tp2"] = _summary(step(batch2.split(2)))

    # Interleaved pipeline (PP=2 x VPP=2: four chunks of one layer) and the fused LM-head loss at TP=2.
    chunks, objs, step = _setup(pp=2, vpp=2, seed=96)
    ckpt.load_checkpoint(os.path.join(root, "init"), objs.model, objs.optimizer, objs.scheduler)
    res = step(batch.split(4))
    out["vpp2"] = {**_summary(res), "grads": _full_grads(chunks)}
    # (the fused path needs real vocabulary rows on every TP rank: pad 100 to 128, not 256)
    chunks, objs, step = _setup(tp=2, seed=95, impl="chunked", divisible_by=64)
    ckpt.load_checkpoint(os.path.join(root, "init"), objs.model, objs.optimizer, objs.scheduler)
    res = step(batch.split(2))
    out["tp2_fused"] = {**_summary(res), "grads": _full_grads(chunks)}
    # Shared prompts at TP=2 (without sequence parallelism: Megatron's local spec, the one whose attention reads the
    # packing, has none), 2 micro-batches.
    chunks, objs, step = _setup(tp=2, seed=94, share_prompts=True)
    ckpt.load_checkpoint(os.path.join(root, "init"), objs.model, objs.optimizer, objs.scheduler)
    res = step(_grouped_batch(3).split(2))
    out["tp2_shared"] = {**_summary(res), "grads": _full_grads(chunks)}

    # Llama-style tied embeddings: at PP=2 the LM head (last stage) and the embedding (first stage) are two
    # copies kept equal by Megatron's embedding group; 3 steps at PP=2 must match DP=2 (== one process).
    for name, layout in (("tied_dp2", {}), ("tied_pp2", {"pp": 2})):
        chunks, objs, step = _setup(seed=11 if layout else 12, tied=True, **layout)
        tied_root = os.path.join(root, "tied")
        if layout:
            ckpt.load_checkpoint(tied_root, objs.model, objs.optimizer, objs.scheduler)
        else:
            ckpt.save_checkpoint(tied_root, 0, objs.model, objs.optimizer, objs.scheduler, {"step": 0})
        dp = mpu.get_data_parallel_world_size()
        mine = batch.shard(mpu.get_data_parallel_rank(), dp).split(2 // dp)
        out[name] = [step(mine).loss for _ in range(3)]

    # Stop and resume at DP=2 with the distributed optimizer (bf16 params, fp32 main params and Adam state
    # sharded over DP) and a progressive horizon.
    def run(step_fn, schedule, first: int, last: int) -> list[float]:
        losses = []
        for k in range(first, last):
            b = _batch(100 + k, window=schedule.window(k)).shard(mpu.get_data_parallel_rank(), 2)
            losses.append(step_fn(b.split(2)).loss)
        return losses

    k = 2
    chunks, objs, step = _setup(distopt=True, bf16=True, seed=3)
    sched = ProgressiveHorizon(10, h0=3, delta_h=2, delta_k=1)
    run(step, sched, 0, k)
    state = {"step": k, "consumed_prompts": 8 * k, "horizon": sched.state_dict()}
    ckpt.save_checkpoint(os.path.join(root, "resume"), k, objs.model, objs.optimizer, objs.scheduler, state)
    out["uninterrupted"] = run(step, sched, k, k + 3)
    chunks, objs, step = _setup(distopt=True, bf16=True, seed=4)
    sched = ProgressiveHorizon(10, h0=3, delta_h=2, delta_k=1)
    loaded = ckpt.load_checkpoint(os.path.join(root, "resume"), objs.model, objs.optimizer, objs.scheduler)
    sched.load_state_dict(loaded["trainer"]["horizon"])
    start = loaded["trainer"]["step"]
    out["resumed"] = run(step, sched, start, start + 3)
    out["resumed_state"] = loaded["trainer"]
    out["latest"] = ckpt.latest_iteration(os.path.join(root, "resume"))
    return out


def _assert_grads_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(ref), f"{what}: parameter names differ: {set(got) ^ set(ref)}"
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Every layout's results (two gloo workers, one spawn for all tests) and the one-process reference step.

    The reference runs here: one process, the whole batch, TP=PP=DP=1, the same initial weights. The tests
    below each check one invariant, so one failure does not hide the others.
    """
    from megatron_opd.training import checkpoint as ckpt

    root = str(tmp_path_factory.mktemp("layouts"))
    results = run_on_ranks(_worker, 2, root)
    chunks, objs, step = _setup(seed=1234)
    ckpt.load_checkpoint(os.path.join(root, "init"), objs.model, objs.optimizer, objs.scheduler)
    ref = step([_batch(1)])
    out = {"root": root, "results": results, "ref": ref, "ref_grads": _full_grads(chunks)}
    chunks, objs, step = _setup(seed=4321)
    ckpt.load_checkpoint(os.path.join(root, "init"), objs.model, objs.optimizer, objs.scheduler)
    out["ref_grouped"] = step([_grouped_batch(3)])  # one process, unpacked: what the packed layout must give
    out["ref_grouped_grads"] = _full_grads(chunks)
    return out


def test_reference_step_is_a_real_update(layouts):
    assert not layouts["ref"].skipped and layouts["ref"].grad_norm > 0


def test_the_step_reports_the_global_loss_on_every_rank(layouts):
    results = layouts["results"]
    assert results[1]["dp2"]["loss"] == results[0]["dp2"]["loss"]


@pytest.mark.parametrize("key", ["dp2", "tp2", "pp2", "vpp2", "tp2_fused"])
def test_layout_matches_one_process(layouts, key):
    results, ref = layouts["results"], layouts["ref"]
    for rank in (0, 1):
        r = results[rank][key]
        assert not r["skipped"]
        assert r["loss"] == pytest.approx(ref.loss, rel=1e-5), (key, rank)
        assert r["grad_norm"] == pytest.approx(ref.grad_norm, rel=1e-4), (key, rank)
    if key in ("pp2", "vpp2"):  # each stage holds its half of the parameters
        grads = {**results[0][key]["grads"], **results[1][key]["grads"]}
    else:
        grads = results[0][key]["grads"]
    _assert_grads_close(grads, layouts["ref_grads"], key)


def test_shared_prompts_at_tp2_match_one_unpacked_process(layouts):
    ref = layouts["ref_grouped"]
    for rank in (0, 1):
        r = layouts["results"][rank]["tp2_shared"]
        assert not r["skipped"]
        assert r["loss"] == pytest.approx(ref.loss, rel=1e-5), rank
        assert r["grad_norm"] == pytest.approx(ref.grad_norm, rel=1e-4), rank
    _assert_grads_close(
        layouts["results"][0]["tp2_shared"]["grads"], layouts["ref_grouped_grads"], "tp2_shared"
    )


def test_checkpoint_moves_between_layouts(layouts):
    """The TP=2 checkpoint (after one step) at TP=1 (here) and at PP=2 (workers): same loss and grad norm on the
    next batch as TP=2 continuing, so weights and Adam state both moved between layouts."""
    from megatron_opd.training import checkpoint as ckpt

    results = layouts["results"]
    chunks, objs, step = _setup(seed=4321)
    ckpt.load_checkpoint(os.path.join(layouts["root"], "tp2"), objs.model, objs.optimizer, objs.scheduler)
    tp1_next = step([_batch(2)])
    tp2_next = results[0]["tp2_next"]
    for got in (tp1_next.loss, results[0]["pp2_from_tp2"]["loss"], results[1]["pp2_from_tp2"]["loss"]):
        assert got == pytest.approx(tp2_next["loss"], rel=1e-5)
    assert tp1_next.grad_norm == pytest.approx(tp2_next["grad_norm"], rel=1e-4)
    # LR schedule restored: warmup over 2 updates gives 5e-4 at update 0 (ref) and 1e-3 at update 1.
    assert layouts["ref"].lr == pytest.approx(5e-4) and tp1_next.lr == pytest.approx(1e-3)


def test_tied_embeddings_at_pp2_match_dp2(layouts):
    for rank in (0, 1):
        r = layouts["results"][rank]
        assert r["tied_pp2"] == pytest.approx(r["tied_dp2"], rel=1e-5)


def test_resume_with_distributed_optimizer_repeats_the_run(layouts):
    """Identical losses for steps k+1..k+3, trainer state restored, marker points at the checkpoint."""
    for rank in (0, 1):
        r = layouts["results"][rank]
        assert r["resumed"] == r["uninterrupted"]
        assert r["resumed_state"]["consumed_prompts"] == 16
        assert r["latest"] == 2
