"""The autograd function for the LM-head + OPD per-token terms that never holds the [N, V] logits.

Why it exists: it turns ``chunked.py``'s per-chunk math into gradients for the hidden states and the LM-head
weight. ``LinearOPDTerms`` returns per-token (log p(y), top-K KL) and accepts ANY upstream gradient on them, so
the caller combines them freely (advantages, masks, ``reference.opd_loss``: what the train step does). Forward
keeps only lse [N] and the top-K student logprobs [N, K]; backward RECOMPUTES each chunk's logits. Cost: 4
LM-head GEMMs (8 N H V/tp FLOPs): logits in forward, logits again + d hidden + d weight in backward.
(Computing the gradient in forward from the loss's known coefficients, as Liger does for cross-entropy, would
save one GEMM; such a loss-returning path was removed because no training path used it.)

FP8 (``fp8.Fp8Mode``): 'grads' runs d hidden and d weight in FP8, 'all' also the logits GEMM (forward and its
recompute, so backward sees the same probabilities as forward). The weight is quantised once per pass over the
chunks (``chunked.quantize_weight``), not once per chunk.

Vocabulary parallelism: the returned/accumulated hidden-state gradient is this rank's partial sum (its
vocabulary shard's contribution), exactly as for ``hidden @ weight_shard.T``; sum it over the TP group where
the hidden states enter the TP region (``adapter.copy_to_tp_region``, Megatron's
``copy_to_tensor_model_parallel_region``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_opd.loss import chunked
from megatron_opd.loss.chunked import Backend
from megatron_opd.loss.fp8 import Fp8Mode


def _dz_dtype(weight: torch.Tensor) -> torch.dtype:
    """dL/dz goes into the gradient GEMMs in the weight's dtype on CUDA (tensor cores; half the traffic)."""
    if weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
        return weight.dtype
    return torch.float32


def _operand(x: torch.Tensor) -> torch.Tensor:
    """GEMM operand: half tensors stay half on CUDA (tensor cores); on CPU upcast once, not per chunk."""
    return x if x.is_cuda else x.float()


def _quantize_weight(weight: torch.Tensor, fp8: Fp8Mode, grad_hidden: bool) -> chunked.Fp8Weight | None:
    """W's FP8 forms for one pass over the chunks: W for the logits ('all'), W^T for d hidden (``grad_hidden``)."""
    logits, grad_hidden = fp8 == "all", grad_hidden and fp8 != "off"
    return chunked.quantize_weight(weight, logits, grad_hidden) if (logits or grad_hidden) else None


def _logits_fp8(weight_fp8: chunked.Fp8Weight | None):
    return None if weight_fp8 is None else weight_fp8.logits


def _forward_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ids: torch.Tensor | None,
    teacher: torch.Tensor | None,
    *,
    topk: int,
    renormalize: bool,
    vocab_start: int,
    tp_group: dist.ProcessGroup | None,
    chunk_size: int,
    backend: Backend,
    fp8: Fp8Mode,
    weight_fp8: chunked.Fp8Weight | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Run the chunk loop; returns (logp [N], kl [N] | None, ids [N, K] | None, s [N, K] | None, lse [N])."""
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    kl_parts, ids_parts, s_parts = [], [], []
    for sl in chunked.chunks(n, chunk_size):
        z = chunked.matmul_nt_fp32(hidden[sl], weight, fp8 == "all", _logits_fp8(weight_fp8))
        terms = chunked.chunk_forward(
            z,
            targets[sl],
            None if ids is None else ids[sl],
            None if teacher is None else teacher[sl],
            topk=topk,
            renormalize=renormalize,
            vocab_start=vocab_start,
            tp_group=tp_group,
            backend=backend,
        )
        logp[sl], lse[sl] = terms.logp, terms.lse
        if terms.ids is not None:
            ids_parts.append(terms.ids)
        if terms.kl is not None:
            kl_parts.append(terms.kl)
            s_parts.append(terms.s)
        del z
    cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
    return logp, cat(kl_parts), cat(ids_parts), cat(s_parts), lse


class LinearOPDTerms(torch.autograd.Function):
    """(hidden [N, H], weight [V/tp, H]) -> (logp [N] fp32, kl [N] fp32 or empty [0]); see module doc."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ids: torch.Tensor | None,
        teacher: torch.Tensor | None,
        topk: int,
        renormalize: bool,
        vocab_start: int,
        tp_group: dist.ProcessGroup | None,
        chunk_size: int,
        backend: Backend,
        fp8: Fp8Mode,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = _operand(hidden), _operand(weight)
        logp, kl, ids_used, s, lse = _forward_chunks(
            h, w, targets, ids, teacher, topk=topk, renormalize=renormalize, vocab_start=vocab_start,
            tp_group=tp_group, chunk_size=chunk_size, backend=backend, fp8=fp8,
            weight_fp8=_quantize_weight(w, fp8, grad_hidden=False),
        )  # fmt: skip
        has_kl = kl is not None
        ctx.save_for_backward(
            hidden, weight, targets, lse,
            *((ids_used, s, teacher) if has_kl else ()),
        )  # fmt: skip
        ctx.has_kl, ctx.renormalize, ctx.vocab_start = has_kl, renormalize, vocab_start
        ctx.chunk_size, ctx.backend, ctx.fp8 = chunk_size, backend, fp8
        if not has_kl:
            kl = torch.empty(0, dtype=torch.float32, device=hidden.device)
            ctx.mark_non_differentiable(kl)
        return logp, kl

    @staticmethod
    def backward(ctx: Any, g_logp: torch.Tensor | None, g_kl: torch.Tensor | None):  # type: ignore[override]
        hidden, weight, targets, lse, *rest = ctx.saved_tensors
        ids, s, teacher = rest if ctx.has_kl else (None, None, None)
        n = hidden.shape[0]
        g_logp = torch.zeros(n, device=hidden.device) if g_logp is None else g_logp.float()
        g_s = None
        if ctx.has_kl and g_kl is not None:
            g_s = chunked.kl_grad(s, teacher, ctx.renormalize, g_kl)
        h, w = _operand(hidden), _operand(weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w_fp8 = _quantize_weight(w, ctx.fp8, grad_hidden=need_h)
        for sl in chunked.chunks(n, ctx.chunk_size):
            z = chunked.matmul_nt_fp32(h[sl], w, ctx.fp8 == "all", _logits_fp8(w_fp8))
            dz = chunked.logits_grad_(
                z, lse[sl], targets[sl], g_logp[sl],
                None if g_s is None else ids[sl], None if g_s is None else g_s[sl],
                vocab_start=ctx.vocab_start, backend=ctx.backend, out_dtype=_dz_dtype(w),
            )  # fmt: skip
            gh = None if grad_h is None else grad_h[sl]
            chunked.accumulate_grads(dz, h[sl], w, gh, grad_w, ctx.fp8 != "off", w_fp8)
            del z, dz
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        return (grad_h, grad_w) + (None,) * 10
