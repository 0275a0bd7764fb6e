"""The functional entry the student step calls: LM-head hidden states + weight shard -> OPD token terms.

Why it exists: one stable signature in front of the four implementations, chosen by ``loss.impl``:

- ``'reference'``: logits = hidden @ weight^T in fp32, then ``reference.opd_token_terms_from_logits`` (the
  specification; holds the full [N, V/tp] logits and their autograd copies).
- ``'chunked'``: pure torch over token chunks (``fused.LinearOPDTerms``, backend 'torch'); never holds more
  than [chunk_size, V/tp] logits. The CPU default.
- ``'triton'``: the same chunk loop with Triton kernels for the softmax passes (``triton_kernels.py``); on
  CPU only under ``TRITON_INTERPRET=1`` (tests).
- ``'auto'``: triton on CUDA, chunked otherwise.

Contract of ``opd_token_terms`` (kept stable for ``training/``): it returns per-token (log p(y), top-K KL) with
gradients flowing to ``hidden`` and ``weight`` from any upstream gradient on either output, so the caller
builds the objective with ``reference.opd_loss``.

Tensor parallelism: ``weight`` is this rank's vocabulary shard, rows [vocab_start, vocab_start + V/tp); ids
are global. Reductions go over the explicit ``tp_group``. ``hidden``'s gradient is this rank's partial sum,
as for any column-parallel linear; wrap ``hidden`` with ``copy_to_tp_region`` (or Megatron's own
``copy_to_tensor_model_parallel_region``) to all-reduce it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from megatron_opd.loss.fp8 import Fp8Mode
from megatron_opd.loss.fused import LinearOPDTerms
from megatron_opd.loss.reference import opd_token_terms_from_logits

Impl = Literal["auto", "reference", "chunked", "triton"]


def resolve_impl(impl: Impl, device: torch.device) -> Literal["reference", "chunked", "triton"]:
    """'auto' -> 'triton' on CUDA (when triton imports), 'chunked' otherwise; others unchanged."""
    if impl != "auto":
        if impl not in ("reference", "chunked", "triton"):
            raise ValueError(f"unknown loss impl {impl!r}; use auto, reference, chunked or triton")
        return impl
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            return "chunked"
    return "chunked"


class _CopyToTPRegion(torch.autograd.Function):
    """Identity forward, all-reduce SUM backward over the TP group (Megatron's copy-to-TP region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def copy_to_tp_region(hidden: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Mark ``hidden`` [N, H] as entering the vocab-parallel LM head: its gradient is summed over ``tp_group``."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return hidden
    return _CopyToTPRegion.apply(hidden, tp_group)


def _fp8_mode(fp8: bool, fp8_forward: bool) -> Fp8Mode:
    if fp8_forward and not fp8:
        raise ValueError("fp8_forward=True needs fp8=True")
    return "all" if fp8_forward else "grads" if fp8 else "off"


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, fp8: bool, impl: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V/tp, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets [N] expected, got {tuple(targets.shape)} for N = {hidden.shape[0]}")
    if fp8 and impl == "reference":
        raise ValueError("fp8 is a property of the fused paths; use impl='chunked', 'triton' or 'auto'")


def opd_token_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    topk: int = 0,
    renormalize: bool = True,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    impl: Impl = "auto",
    chunk_size: int = 1024,
    fp8: bool = False,
    fp8_forward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student per-token terms straight from the LM head, without the [N, V] logits (except impl='reference').

    Args:
        hidden: [N, H] last hidden states (bf16/fp16/fp32), with gradient.
        weight: [V/tp, H] LM-head weight shard, with gradient.
        targets: [N] sampled token ids (global).
        topk_ids: [N, K] ids for the KL (teacher top-K strategy), or None.
        teacher_topk_logprobs: [N, K] teacher logprobs at the ids; without them no KL is computed.
        topk: K for the student top-K strategy: ids chosen inside from the student's logits (no gradient)
            when ``topk_ids`` is None.
        renormalize: renormalise both distributions over the K ids (``reference.topk_reverse_kl``).
        vocab_start: first global id of this rank's shard.
        tp_group: vocabulary-parallel group (None: unsharded).
        impl: 'auto' | 'reference' | 'chunked' | 'triton' (module doc).
        chunk_size: tokens per chunk for chunked/triton.
        fp8: run the two gradient GEMMs of the LM head in FP8 with per-row scales (``fp8.py``; chunked/triton
            only); the logits, and so both outputs, keep bf16-input/fp32 accuracy.
        fp8_forward: with ``fp8``, also compute the logits in FP8 (faster, but e4m3 logits move log p by
            ~0.1 at H = 1536; see tests/gpu/test_loss_gpu.py).
    Returns:
        (logprobs [N] fp32, top-K reverse KL [N] fp32 or None); both carry gradients to hidden and weight.
    """
    impl_r = resolve_impl(impl, hidden.device)
    _check(hidden, weight, targets, fp8, impl_r)
    fp8_mode = _fp8_mode(fp8, fp8_forward)
    if impl_r == "reference":
        logits = torch.mm(hidden.float(), weight.float().t())
        logp, kl, _ = opd_token_terms_from_logits(
            logits, targets, topk=topk, topk_ids_given=topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
            renormalize=renormalize, vocab_start=vocab_start, tp_group=tp_group,
        )  # fmt: skip
        return logp, kl
    backend = "torch" if impl_r == "chunked" else "triton"
    logp, kl = LinearOPDTerms.apply(
        hidden, weight, targets, topk_ids, teacher_topk_logprobs, topk, renormalize, vocab_start, tp_group,
        chunk_size, backend, fp8_mode,
    )  # fmt: skip
    has_kl = teacher_topk_logprobs is not None and (topk_ids is not None or topk > 0)
    return logp, (kl if has_kl else None)
