"""Student and teacher LM heads together, over token chunks and vocabulary tiles: the [N, V] logits of neither exist.

Why it exists: with the teacher inside the trainer (``teacher.backend: megatron``) the loss can see both models'
final hidden states. From them it needs, per distilled token, log p_S(y), log p_T(y) (the advantage's r_t), the
top-K reverse KL over the student's (or teacher's) K most likely ids and, optionally, the exact reverse KL over
the whole vocabulary. ``reference.two_model_token_terms_from_logits`` states that math on full logits; this
module computes the same numbers holding at most a [chunk, tile] block of each model's logits.

Forward, per chunk of C tokens, one pass over vocabulary tiles of both models (online softmax): per model a
running (max m, sum-exp l); for the student also a = sum_v exp(z_S - m_S)(z_S - z_T), rescaled with l when the
max moves; and a running top-K (values, ids) merged tile by tile with ``reference.topk_of_candidates``. Over the
TP group the per-rank triples combine as in ``chunked.chunk_log_partition``. Then

    lse = m + log l,   KL_full = a / l - lse_S + lse_T   (= sum_v p_S (log p_S - log p_T)),

and the logits at the sampled token and the K ids are dot products with the K + 1 gathered weight rows.

Backward recomputes each tile's logits (the student's; the teacher's only for the full KL):

    dL/dz_S = g_logp onehot(y) + sum_k g_s[k] onehot(id_k) - (g_logp + sum_k g_s[k]) p_S
              + g_full p_S ((log p_S - log p_T) - KL_full)

with g_s from autograd through ``reference.topk_reverse_kl`` on [N, K] (``chunked.kl_grad``). Saved between
forward and backward: lse of both models, KL_full, the ids and the [N, K] logprobs of both models.

The GEMMs are torch matmuls per tile (cuBLAS), as in the single-model path. impl 'chunked' does the per-tile
passes in torch; 'triton' in the kernels of ``two_model_triton`` (one pass per tile pair for both models'
online softmax, the full-KL accumulator and the logits at y; one in-place pass for the dense part of dL/dz_S);
'auto' is 'triton' on CUDA, 'chunked' otherwise; 'reference' builds both logits blocks and calls the reference.
``fp8`` runs the student's two gradient GEMMs in FP8 (``fp8.py``, as ``loss.fp8_lm_head`` does for the single
model); the logits of both models stay fp32, so every forward output is unchanged. The teacher's hidden states and weight never get
gradients. Vocabulary parallelism as in ``adapter``: both weights are this rank's shard of the same ids; wrap
the student's hidden states in ``adapter.copy_to_tp_region``.

``model_scores`` is the one-model half of the forward (no gradient): a teacher's log p at the sampled token and
at given (or its own) top-K ids over tiles, for ``MegatronTeacher.score``'s ``TeacherScores``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_opd.loss import chunked
from megatron_opd.loss.reference import (
    topk_of_candidates,
    topk_reverse_kl,
    tp_max,
    tp_sum,
    two_model_token_terms_from_logits,
)

__all__ = ["TwoModelTerms", "two_model_terms", "logits_at", "model_scores"]

DEFAULT_TILE = 8192
PAD_LOGIT = -1e30  # finite (not -inf) so p * log p terms at padding ids stay 0 instead of NaN


def logits_at(
    hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, vocab_start: int, tp_group
) -> torch.Tensor:
    """z[n, m] = hidden[n] . weight[ids[n, m]] (fp32) for global ids, whichever rank holds the row.

    hidden [C, H], weight [V/tp, H], ids [C, M] -> [C, M]; costs C*M*H, not C*V*H.
    """
    if weight.shape[0] == 0:  # this rank holds only vocabulary padding
        return tp_sum(torch.zeros(ids.shape, device=hidden.device), tp_group)
    local = ids - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    rows = weight[local.clamp(0, weight.shape[0] - 1)].float()  # [C, M, H]
    z = torch.einsum("ch,cmh->cm", hidden.float(), rows)
    return tp_sum(torch.where(inside, z, torch.zeros_like(z)), tp_group)


_ID_BITS = 24  # tiles of at most 2^24 columns


def tile_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K largest of z [C, t] fp32 by (value desc, column asc), as ``reference.topk_ids``'s stable sort picks
    them, but with ``torch.topk`` (a full sort per tile costs more than the GEMMs). -> ([C, K] values, columns).

    Exact: the float's bits map monotonically to an int32, shifted left and joined with the reversed column, so
    the int64 keys are distinct and their order is the stable order.
    """
    if z.shape[1] >= 1 << _ID_BITS:
        raise ValueError(f"vocabulary tile of {z.shape[1]} columns; use at most {1 << _ID_BITS}")
    bits = z.float().contiguous().view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    col = torch.arange(z.shape[1], device=z.device)
    key = (ordered << _ID_BITS) + ((1 << _ID_BITS) - 1 - col)
    idx = torch.topk(key, k, dim=-1).indices
    return torch.gather(z, -1, idx), idx


def _tiles(v: int, tile: int) -> list[slice]:
    return [slice(i, min(i + tile, v)) for i in range(0, v, tile)]


def _merge_topk(top_v, top_i, z, k: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-K (values [C, <=K], global ids) merged with a logits tile z [C, t] of ids start .. start+t-1."""
    vals, idx = tile_topk(z, min(k, z.shape[1]))
    cand_v, cand_i = torch.cat([top_v, vals], -1), torch.cat([top_i, idx + start], -1)
    return topk_of_candidates(cand_v, cand_i, min(k, cand_v.shape[1]))


def _global_topk(top_v: torch.Tensor, top_i: torch.Tensor, k: int, tp_group) -> torch.Tensor:
    """This rank's top-K candidates [C, <=K] -> the top-K ids [C, K] over the TP group (stable order)."""
    if top_v.shape[1] < k:  # a shard narrower than K: -inf candidates keep the TP gather's shapes equal
        pad = k - top_v.shape[1]
        top_v = torch.cat([top_v, top_v.new_full((top_v.shape[0], pad), -float("inf"))], -1)
        top_i = torch.cat([top_i, top_i.new_full((top_i.shape[0], pad), -1)], -1)
    return topk_of_candidates(top_v, top_i, k, tp_group)[1]


def _online_(state: list[torch.Tensor], z: torch.Tensor, extra: torch.Tensor | None = None) -> None:
    """Fold a logits tile z [C, t] into state [m, l(, a)]: running max, sum exp(z - m)(, sum exp(z - m) extra)."""
    m, sum_exp = state[0], state[1]
    m_new = torch.maximum(m, z.max(-1).values)
    scale = torch.exp(m - m_new)
    e = torch.exp(z - m_new.unsqueeze(-1))
    state[0], state[1] = m_new, sum_exp * scale + e.sum(-1)
    if extra is not None:
        state[2] = state[2] * scale + (e * extra).sum(-1)


def _combine(state: list[torch.Tensor], tp_group) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-rank [m, l(, a)] -> (global lse, global a / l or None)."""
    gm = tp_max(state[0], tp_group)
    w = torch.exp(state[0] - gm)
    sum_exp = tp_sum(state[1] * w, tp_group)
    ratio = tp_sum(state[2] * w, tp_group) / sum_exp if len(state) > 2 else None
    return gm + torch.log(sum_exp), ratio


def _chunk_forward(
    hs, ws, ht, wt, targets, *, topk, strategy, renormalize, full_kl, vocab_start, tp_group, tile, backend
):
    """One token chunk: dict of lse_s, lse_t, logp, teacher_logp, ids, s, t, topk_kl, full_kl (None if unused)."""
    c = hs.shape[0]
    if backend == "triton":
        from megatron_opd.loss import two_model_triton as tt

        state = tt.new_state(c, hs.device)
    else:
        neg = torch.full((c,), -float("inf"), device=hs.device)
        zero = torch.zeros(c, device=hs.device)
        st_s = [neg, zero] + ([zero] if full_kl else [])
        st_t = [neg, zero]
    top_v = torch.empty(c, 0, device=hs.device)
    top_i = torch.empty(c, 0, dtype=torch.long, device=hs.device)
    for sl in _tiles(ws.shape[0], tile):
        zs = chunked.matmul_nt_fp32(hs, ws[sl])
        zt = chunked.matmul_nt_fp32(ht, wt[sl])
        if backend == "triton":
            tt.tile_stats_(zs, zt, state, targets, vocab_start + sl.start, full_kl)
        else:
            _online_(st_s, zs, zs - zt if full_kl else None)
            _online_(st_t, zt)
        if topk > 0:
            top_v, top_i = _merge_topk(
                top_v, top_i, zs if strategy == "student" else zt, topk, vocab_start + sl.start
            )
        del zs, zt
    if backend == "triton":
        st_s = [state[0], state[1]] + ([state[2]] if full_kl else [])
        st_t = [state[3], state[4]]
    lse_s, ratio = _combine(st_s, tp_group)
    lse_t, _ = _combine(st_t, tp_group)
    out: dict[str, Any] = dict(lse_s=lse_s, lse_t=lse_t, ids=None, s=None, t=None, topk_kl=None, full_kl=None)
    if topk > 0:
        out["ids"] = _global_topk(top_v, top_i, topk, tp_group)
    if backend == "triton":  # the kernel gathered the logits at y from its tile; only the K ids remain
        ids = out["ids"] if topk > 0 else torch.empty(c, 0, dtype=torch.long, device=hs.device)
        z_y = tp_sum(state[5:7], tp_group)  # [2, C]: each rank's tile holding y added its logit, the others 0
        zs_at = torch.cat([z_y[0].unsqueeze(-1), logits_at(hs, ws, ids, vocab_start, tp_group)], -1)
        zt_at = torch.cat([z_y[1].unsqueeze(-1), logits_at(ht, wt, ids, vocab_start, tp_group)], -1)
    else:
        ids = targets.unsqueeze(-1) if topk == 0 else torch.cat([targets.unsqueeze(-1), out["ids"]], -1)
        zs_at = logits_at(hs, ws, ids, vocab_start, tp_group)
        zt_at = logits_at(ht, wt, ids, vocab_start, tp_group)
    zs_at = zs_at - lse_s.unsqueeze(-1)
    zt_at = zt_at - lse_t.unsqueeze(-1)
    out["logp"], out["teacher_logp"] = zs_at[:, 0], zt_at[:, 0]
    if topk > 0:
        out["s"], out["t"] = zs_at[:, 1:], zt_at[:, 1:]
        out["topk_kl"] = topk_reverse_kl(out["s"], out["t"], renormalize)
    if full_kl:
        out["full_kl"] = ratio - lse_s + lse_t
    return out


class TwoModelTerms(torch.autograd.Function):
    """(hs [N, Hs], ws [V/tp, Hs], ht [N, Ht], wt [V/tp, Ht]) -> (logp [N], teacher_logp [N], topk_kl [N] or [0],
    full_kl [N] or [0], ids [N, K] or [0]); gradients to hs and ws only (module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hs: torch.Tensor,
        ws: torch.Tensor,
        ht: torch.Tensor,
        wt: torch.Tensor,
        targets: torch.Tensor,
        topk: int,
        strategy: str,
        renormalize: bool,
        full_kl: bool,
        vocab_start: int,
        tp_group: dist.ProcessGroup | None,
        chunk_size: int,
        tile: int,
        backend: chunked.Backend,
        fp8: bool,
    ):
        h_s, w_s = _operand(hs), _operand(ws)
        h_t, w_t = _operand(ht.detach()), _operand(wt.detach())
        parts: list[dict[str, Any]] = []
        for sl in chunked.chunks(hs.shape[0], chunk_size):
            parts.append(
                _chunk_forward(
                    h_s[sl],
                    w_s,
                    h_t[sl],
                    w_t,
                    targets[sl],
                    topk=topk,
                    strategy=strategy,
                    renormalize=renormalize,
                    full_kl=full_kl,
                    vocab_start=vocab_start,
                    tp_group=tp_group,
                    tile=tile,
                    backend=backend,
                )  # fmt: skip
            )
        dev = hs.device

        def cat(key: str, empty_shape=(0,), dtype=torch.float32) -> torch.Tensor:
            if not parts or parts[0][key] is None:
                return torch.empty(empty_shape if parts else (0,), dtype=dtype, device=dev)
            return torch.cat([p[key] for p in parts])

        logp, teacher_logp = cat("logp"), cat("teacher_logp")
        lse_s, lse_t = cat("lse_s"), cat("lse_t")
        ids, s, t = cat("ids", dtype=torch.long), cat("s"), cat("t")
        kl_k, kl_f = cat("topk_kl"), cat("full_kl")
        if hs.shape[0] == 0:  # no tokens: shapes for the (empty) outputs
            ids = torch.empty(0, topk, dtype=torch.long, device=dev) if topk else ids
        ctx.save_for_backward(hs, ws, ht, wt, targets, lse_s, lse_t, ids, s, t, kl_f)
        ctx.cfg = dict(
            topk=topk, renormalize=renormalize, full_kl=full_kl, vocab_start=vocab_start, chunk_size=chunk_size,
            tile=tile, backend=backend, fp8=fp8,
        )  # fmt: skip
        ctx.mark_non_differentiable(teacher_logp, ids)
        return logp, teacher_logp, kl_k, kl_f, ids

    @staticmethod
    def backward(ctx: Any, g_logp, _g_tlp, g_kl, g_full, _g_ids):  # type: ignore[override]
        hs, ws, ht, wt, targets, lse_s, lse_t, ids, s, t, kl_f = ctx.saved_tensors
        cfg = ctx.cfg
        n = hs.shape[0]
        if n == 0:  # a micro-batch without distilled tokens: nothing flows back
            return (torch.zeros_like(hs), torch.zeros_like(ws)) + (None,) * 13
        g_logp = torch.zeros(n, device=hs.device) if g_logp is None else g_logp.float()
        use_topk = cfg["topk"] > 0 and g_kl is not None and g_kl.numel() == n
        use_full = cfg["full_kl"] and g_full is not None and g_full.numel() == n
        g_s = chunked.kl_grad(s, t, cfg["renormalize"], g_kl) if use_topk else None
        h_s, w_s = _operand(hs), _operand(ws)
        h_t, w_t = _operand(ht.detach()), _operand(wt.detach())
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(hs.shape, dtype=torch.float32, device=hs.device) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
        tiles = _tiles(ws.shape[0], cfg["tile"])
        # FP8 gradient GEMMs: each tile's W^T quantised once per backward, not once per chunk.
        w_fp8 = [chunked.quantize_weight(w_s[vt], False, need_h) for vt in tiles] if cfg["fp8"] else None
        triton = cfg["backend"] == "triton"
        if triton:
            from megatron_opd.loss.two_model_triton import tile_grad_
        for sl in chunked.chunks(n, cfg["chunk_size"]):
            c = g_logp[sl] if g_s is None else g_logp[sl] + g_s[sl].sum(-1)
            for i, vt in enumerate(tiles):
                zs = chunked.matmul_nt_fp32(h_s[sl], w_s[vt])
                zt = chunked.matmul_nt_fp32(h_t[sl], w_t[vt]) if use_full else None
                if triton:
                    full = (lse_t[sl], g_full[sl], kl_f[sl]) if use_full else (None, None, None)
                    dz = tile_grad_(zs, lse_s[sl], c, zt, *full)
                else:
                    logp_s = zs.sub_(lse_s[sl].unsqueeze(-1))
                    p = torch.exp(logp_s)
                    dz = p * (-c).unsqueeze(-1)
                    if use_full:
                        diff = logp_s - zt.sub_(lse_t[sl].unsqueeze(-1)) - kl_f[sl].unsqueeze(-1)
                        dz += p * diff * g_full[sl].float().unsqueeze(-1)
                        del diff
                    del p
                start = cfg["vocab_start"] + vt.start
                chunked._scatter_local_(dz, targets[sl].unsqueeze(-1), g_logp[sl].unsqueeze(-1), start)
                if g_s is not None:
                    chunked._scatter_local_(dz, ids[sl], g_s[sl], start)
                gh = None if grad_h is None else grad_h[sl]
                gw = None if grad_w is None else grad_w[vt]
                chunked.accumulate_grads(
                    dz, h_s[sl], w_s[vt], gh, gw, cfg["fp8"], None if w_fp8 is None else w_fp8[i]
                )
                del zs, zt, dz
        grad_h = None if grad_h is None else grad_h.to(hs.dtype)
        grad_w = None if grad_w is None else grad_w.to(ws.dtype)
        return (grad_h, grad_w) + (None,) * 13


def _real_rows(weight: torch.Tensor, vocab_size: int | None, vocab_start: int) -> int:
    """How many of this shard's rows [V/tp] are real ids (< ``vocab_size``); the rest are embedding padding."""
    return weight.shape[0] if vocab_size is None else min(max(vocab_size - vocab_start, 0), weight.shape[0])


def _operand(x: torch.Tensor) -> torch.Tensor:
    """GEMM operand: half tensors stay half on CUDA (tensor cores); on CPU upcast once, not per tile."""
    return x if x.is_cuda else x.float()


def two_model_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    topk: int = 0,
    strategy: str = "student",
    renormalize: bool = True,
    full_kl: bool = False,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    impl: str = "auto",
    chunk_size: int = 1024,
    tile: int = DEFAULT_TILE,
    vocab_size: int | None = None,
    fp8: bool = False,
) -> dict[str, torch.Tensor | None]:
    """``reference.two_model_token_terms_from_logits`` from hidden states and LM-head shards (module doc).

    Args:
        hidden: [N, Hs] the student's final hidden states (with gradient); weight: [V/tp, Hs] its LM-head shard.
        teacher_hidden: [N, Ht]; teacher_weight: [V/tp, Ht], the same vocabulary rows as ``weight``.
        targets: [N] sampled ids. topk / strategy / renormalize / full_kl: as the reference.
        impl: 'reference' (both [N, V/tp] logits, fp32), or 'chunked' / 'triton' / 'auto' (this module's tiles,
            torch or Triton per-tile passes; 'auto': Triton on CUDA).
        chunk_size: tokens per chunk; tile: vocabulary rows per tile.
        vocab_size: the real vocabulary; shard rows of global id >= it are embedding padding and stay out of
            every softmax (a rank may hold padding only). None: every row is real.
        fp8: the student's d hidden and d weight GEMMs in FP8 (not with impl 'reference').
    Returns:
        the reference's dict: logp, teacher_logp, ids, topk_kl, full_kl ([N] / [N, K] or None).
    """
    if hidden.dim() != 2 or teacher_hidden.dim() != 2 or hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"hidden [N, Hs] and teacher_hidden [N, Ht] with the same N expected, got {tuple(hidden.shape)}, "
            f"{tuple(teacher_hidden.shape)}"
        )
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher LM-head shards must cover the same vocabulary rows, got {weight.shape[0]} and "
            f"{teacher_weight.shape[0]}"
        )
    if weight.shape[1] != hidden.shape[1] or teacher_weight.shape[1] != teacher_hidden.shape[1]:
        raise ValueError(
            "each LM head's width must match its hidden states (weight [V/tp, H], hidden [N, H])"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets [N] expected, got {tuple(targets.shape)} for N = {hidden.shape[0]}")
    if strategy not in ("student", "teacher"):
        raise ValueError(f"unknown top-K strategy {strategy!r}; use 'student' or 'teacher'")
    from megatron_opd.loss.adapter import resolve_impl

    impl = resolve_impl(impl, hidden.device)  # type: ignore[arg-type]
    if fp8 and impl == "reference":
        raise ValueError("fp8 is a property of the tiled paths; use impl='chunked', 'triton' or 'auto'")
    real = _real_rows(weight, vocab_size, vocab_start)
    if impl == "reference":
        zs = torch.mm(hidden.float(), weight.float().t())
        zt = torch.mm(teacher_hidden.detach().float(), teacher_weight.detach().float().t())
        if real < weight.shape[0]:
            pad = torch.arange(weight.shape[0], device=zs.device) >= real
            zs, zt = zs.masked_fill(pad, PAD_LOGIT), zt.masked_fill(pad, PAD_LOGIT)
        return two_model_token_terms_from_logits(
            zs, zt, targets, topk=topk, strategy=strategy, renormalize=renormalize, full_kl=full_kl,
            vocab_start=vocab_start, tp_group=tp_group,
        )  # fmt: skip
    if chunk_size < 1 or tile < 1:
        raise ValueError(f"chunk_size and tile must be positive, got {chunk_size} and {tile}")
    logp, tlp, kl_k, kl_f, ids = TwoModelTerms.apply(
        hidden, weight[:real], teacher_hidden, teacher_weight[:real], targets, topk, strategy, renormalize, full_kl,
        vocab_start, tp_group, chunk_size, tile, "torch" if impl == "chunked" else "triton", fp8,
    )  # fmt: skip
    return {
        "logp": logp,
        "teacher_logp": tlp,
        "ids": ids if topk > 0 else None,
        "topk_kl": kl_k if topk > 0 else None,
        "full_kl": kl_f if full_kl else None,
    }


@torch.no_grad()
def model_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ids: torch.Tensor | None = None,
    topk: int = 0,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    impl: str = "auto",
    chunk_size: int = 1024,
    tile: int = DEFAULT_TILE,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One model's log p(y) and log p at K ids, over vocabulary tiles: a teacher's scores (``TeacherScores``).

    Why: ``MegatronTeacher.score`` (and the teacher-side cost in ``benchmarks/bench_teacher.py``) needs the
    teacher's log p at the sampled token and at the student's given top-K ids, or at its own top-K, without a
    [N, V/tp] block: per tile an online logsumexp (torch, or ``triton_kernels.row_max_sumexp`` with impl
    'triton'), the running top-K when ``topk`` > 0 and ``ids`` is None, then K + 1 dot products per token.

    Args:
        hidden [N, H], weight [V/tp, H] (this rank's shard), targets [N] global ids.
        ids: [N, K] global ids to score (e.g. the student's top-K), or None.
        topk: with ``ids`` None, score the model's own top-K (ties as ``reference.topk_ids``).
        impl: 'auto' ('triton' on CUDA), 'chunked' or 'triton'; vocab_size: as ``two_model_terms``.
    Returns:
        (log p(y) [N], the ids scored [N, K] or None, log p at them [N, K] or None), fp32, no gradient.
    """
    from megatron_opd.loss.adapter import resolve_impl

    impl = resolve_impl(impl, hidden.device)  # type: ignore[arg-type]
    if impl == "reference":
        raise ValueError("model_scores is tiled; use impl 'chunked', 'triton' or 'auto'")
    if ids is not None and (ids.dim() != 2 or ids.shape[0] != hidden.shape[0]):
        raise ValueError(f"ids [N, K] expected for N = {hidden.shape[0]}, got {tuple(ids.shape)}")
    real = _real_rows(weight, vocab_size, vocab_start)
    h, w = _operand(hidden), _operand(weight[:real])
    own = ids is None and topk > 0
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    for sl in chunked.chunks(h.shape[0], chunk_size):
        c = sl.stop - sl.start
        state = [torch.full((c,), -float("inf"), device=h.device), torch.zeros(c, device=h.device)]
        top_v = torch.empty(c, 0, device=h.device)
        top_i = torch.empty(c, 0, dtype=torch.long, device=h.device)
        for vt in _tiles(w.shape[0], tile):
            z = chunked.matmul_nt_fp32(h[sl], w[vt])
            if impl == "triton":
                from megatron_opd.loss.triton_kernels import row_max_sumexp

                m_t, l_t = row_max_sumexp(z)
                m_new = torch.maximum(state[0], m_t)
                state = [m_new, state[1] * torch.exp(state[0] - m_new) + l_t * torch.exp(m_t - m_new)]
            else:
                _online_(state, z)
            if own:
                top_v, top_i = _merge_topk(top_v, top_i, z, topk, vocab_start + vt.start)
            del z
        lse, _ = _combine(state, tp_group)
        at = ids[sl] if ids is not None else _global_topk(top_v, top_i, topk, tp_group) if own else None
        cols = targets[sl].unsqueeze(-1) if at is None else torch.cat([targets[sl].unsqueeze(-1), at], -1)
        lp = logits_at(h[sl], w, cols, vocab_start, tp_group) - lse.unsqueeze(-1)
        parts.append((lp[:, 0], at, None if at is None else lp[:, 1:]))
    if not parts:
        k = ids.shape[1] if ids is not None else topk
        empty = torch.empty(0, k, device=hidden.device)
        return torch.empty(0, device=hidden.device), (empty.long() if k else None), (empty if k else None)
    logp = torch.cat([p[0] for p in parts])
    if parts[0][1] is None:
        return logp, None, None
    return logp, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
