"""The reference OPD loss: pure torch, fp32, the specification every fused path is checked against.

Why it exists: the loss is where a subtle bug silently biases every gradient. This module states the math
once, readably, on full (or vocabulary-sharded) logits; ``loss/chunked.py`` and the Triton kernel reuse these
pieces or are tested against them.

The objective per distilled token t (mask = response tokens inside the horizon window):

    loss_t = pg_coef * ( -sg(A_t) * log p_student(y_t) )          policy gradient on the log-ratio (Eq. 4-7)
           + topk_kl_coef * KL_K(t)                                 reverse KL over K tokens (Table 3, K = 16)
           + full_kl_coef * KL(t)                                   exact reverse KL over the whole vocabulary

``KL(t)`` (``full_reverse_kl``) needs the teacher's full distribution, so only the teacher inside the trainer
(``teacher.backend: megatron``, ``two_model_token_terms_from_logits``) can supply it.

``A_t`` comes from ``algorithms.advantage`` (token-level A_t = r_t by default, Eq. 6). Its gradient is
-A_t * grad log p_student(y_t), i.e. the paper's r_t * s_t ascent direction.

Top-K reverse KL (``topk_reverse_kl``), over a set S_t of K token ids per position:
- strategy 'student' (paper default): S_t = the student's K most likely tokens (ids chosen without gradient);
  the teacher supplies its logprobs at those ids.
- strategy 'teacher': S_t = the teacher's top-K ids with the teacher's logprobs.
- renormalize=True: q_s = softmax_S(log p_s), q_t = softmax_S(log p_t), KL = sum_S q_s (log q_s - log q_t), a
  proper KL between the two distributions restricted to S (>= 0).
  renormalize=False: KL = sum_S p_s (log p_s - log p_t) with the raw probabilities, the truncated sum of the
  full-vocabulary reverse KL (can be negative when S misses mass).

Normalisation of the summed token losses (``normalize``):
- 'token_mean': divide by the number of distilled tokens in the global batch (pass ``num_tokens`` when the
  batch is split over micro-batches or data-parallel ranks so every piece divides by the same count);
- 'sequence_mean': each sequence's token mean, averaged over sequences (pass ``num_sequences`` likewise);
- 'constant': divide by a fixed constant (e.g. T_max * batch, Dr. GRPO style), independent of lengths.

Vocabulary parallelism: every function taking ``tp_group`` expects logits split along the last dimension, rank
r holding ids [vocab_start, vocab_start + V/tp). Max, sum-exp and gathered-logit reductions are all-reduces over
``tp_group`` (as Megatron's ``VocabParallelCrossEntropy``); the sum reductions are differentiable with identity
backward, so each rank gets exactly the gradient of its own logit shard. ``tp_group=None`` means unsharded.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

Normalization = Literal["token_mean", "sequence_mean", "constant"]


# ----------------------------------------------------------------------------------------------------------
# vocab-parallel primitives
# ----------------------------------------------------------------------------------------------------------
class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Forward: all-reduce SUM over the TP group. Backward: identity (Megatron's reduce-from-TP region).

    Every TP rank computes the same loss from the reduced value, so the gradient each rank needs for its own
    summand is exactly the incoming gradient; an all-reduce in backward would count it tp times.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def tp_sum(x: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable sum over the TP group (no-op without one)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return x
    return _AllReduceSumIdentityBackward.apply(x, tp_group)


def tp_max(x: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Max over the TP group, without gradient (used only as a numerical shift)."""
    x = x.detach().clone()
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=tp_group)
    return x


def log_partition(logits: torch.Tensor, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """log sum_v exp(z_v) over the (possibly sharded) vocabulary. logits [..., V/tp] -> [...] fp32."""
    z = logits.float()
    m = tp_max(z.max(dim=-1).values, tp_group)
    sum_exp = tp_sum(torch.exp(z - m.unsqueeze(-1)).sum(dim=-1), tp_group)
    return m + torch.log(sum_exp)


def gather_logits(
    logits: torch.Tensor, ids: torch.Tensor, vocab_start: int = 0, tp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """z[..., ids] for global token ids, whichever rank holds them. logits [..., V/tp], ids [..., K] -> [..., K]."""
    z = logits.float()
    local = ids - vocab_start
    inside = (local >= 0) & (local < z.shape[-1])
    picked = torch.gather(z, -1, local.clamp(0, z.shape[-1] - 1))
    picked = torch.where(inside, picked, torch.zeros_like(picked))
    return tp_sum(picked, tp_group)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """log p(y_t) = z_{y_t} - logsumexp(z) (Eq. 1's student/teacher term). logits [N, V/tp], targets [N] -> [N]."""
    lse = log_partition(logits, tp_group)
    return gather_logits(logits, targets.unsqueeze(-1), vocab_start, tp_group).squeeze(-1) - lse


def logprobs_at(
    logits: torch.Tensor,
    ids: torch.Tensor,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """log p(v) at K given ids per position. logits [N, V/tp], ids [N, K] -> [N, K] fp32."""
    lse = log_partition(logits, tp_group)
    return gather_logits(logits, ids, vocab_start, tp_group) - lse.unsqueeze(-1)


def topk_ids(
    logits: torch.Tensor, k: int, vocab_start: int = 0, tp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Global ids of the K largest logits per position (no gradient). logits [N, V/tp] -> [N, K] int64.

    Each rank proposes its local top-K; the K best of the gathered tp*K candidates are global (ties broken by
    the lower id, as a stable full-vocabulary top-K would).
    """
    z = logits.detach().float()
    k_local = min(k, z.shape[-1])
    # A stable sort (not torch.topk) so that among equal logits the lower id wins on every rank.
    vals, idx = torch.sort(z, dim=-1, descending=True, stable=True)
    return topk_of_candidates(vals[..., :k_local], idx[..., :k_local] + vocab_start, k, tp_group)[1]


def topk_of_candidates(
    vals: torch.Tensor, idx: torch.Tensor, k: int, tp_group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K best (value desc, then id asc) of candidate (logit, global id) pairs, over the TP group too.

    vals, idx: [N, C] candidates of this rank (no gradient) -> ([N, K] values, [N, K] int64 ids). Used by
    ``topk_ids`` and by the vocabulary-tiled paths, which merge a running top-K with each tile's.
    """
    vals, idx = vals.detach(), idx
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        world = dist.get_world_size(tp_group)
        all_vals = [torch.empty_like(vals) for _ in range(world)]
        all_idx = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(all_vals, vals.contiguous(), group=tp_group)
        dist.all_gather(all_idx, idx.contiguous(), group=tp_group)
        vals, idx = torch.cat(all_vals, -1), torch.cat(all_idx, -1)
    if vals.shape[-1] < k:
        raise ValueError(f"top-K with K = {k} needs a vocabulary of at least K tokens, got {vals.shape[-1]}")
    # Sort by (value desc, id asc) so the choice is deterministic and layout-independent.
    order = torch.argsort(idx, dim=-1, stable=True)
    vals, idx = torch.gather(vals, -1, order), torch.gather(idx, -1, order)
    best = torch.sort(vals, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(vals, -1, best), torch.gather(idx, -1, best)


def entropy(logits: torch.Tensor, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Entropy of softmax(z) per position, for metrics. logits [N, V/tp] -> [N] fp32."""
    z = logits.detach().float()
    lse = log_partition(z, tp_group)
    p = torch.exp(z - lse.unsqueeze(-1))
    return lse - tp_sum((p * z).sum(-1), tp_group)


# ----------------------------------------------------------------------------------------------------------
# the loss terms
# ----------------------------------------------------------------------------------------------------------
def topk_reverse_kl(
    student_logprobs_k: torch.Tensor, teacher_logprobs_k: torch.Tensor, renormalize: bool = True
) -> torch.Tensor:
    """Reverse KL(student || teacher) over K tokens per position (module doc). [N, K] x [N, K] -> [N] fp32.

    Gradient flows through ``student_logprobs_k`` only; teacher values are constants.
    """
    s = student_logprobs_k.float()
    t = teacher_logprobs_k.detach().float()
    if renormalize:
        s = torch.log_softmax(s, dim=-1)
        t = torch.log_softmax(t, dim=-1)
    return (torch.exp(s) * (s - t)).sum(-1)


def full_reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Exact reverse KL(student || teacher) over the whole (sharded) vocabulary. [N, V/tp] x [N, V/tp] -> [N].

    sum_v p_S(v) (log p_S(v) - log p_T(v)) = A / S - lse_S + lse_T with S = sum_v exp(z_S - m) and
    A = sum_v exp(z_S - m) (z_S - z_T) (m: the global max, a constant shift). Written so, every TP sum is of
    this rank's logits alone and the global log-partitions stay outside them, so the identity-backward sums give
    each rank the exact gradient of its shard (a sum over exp(z - lse) would hand each rank only its own share
    of d/d lse). Both shards must cover the same ids. Gradient flows to the student logits only:
    dKL/dz_S(v) = p_S(v) ((log p_S(v) - log p_T(v)) - KL).
    """
    zs = student_logits.float()
    zt = teacher_logits.detach().float()
    m = tp_max(zs.max(dim=-1).values, tp_group).unsqueeze(-1)
    e = torch.exp(zs - m)
    ratio = tp_sum((e * (zs - zt)).sum(-1), tp_group) / tp_sum(e.sum(-1), tp_group)
    return ratio - log_partition(zs, tp_group) + log_partition(zt, tp_group)


def normalize(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    mode: Normalization = "token_mean",
    *,
    constant: float = 1.0,
    num_tokens: float | torch.Tensor | None = None,
    num_sequences: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce [B, T] per-token losses to a scalar (module doc). ``num_tokens``/``num_sequences`` default to
    this batch's counts; pass the global ones when the batch is one piece of a larger one."""
    m = mask.float()
    x = token_losses.float() * m
    if mode == "token_mean":
        denom = m.sum() if num_tokens is None else num_tokens
        return x.sum() / torch.clamp(torch.as_tensor(denom, dtype=torch.float32), min=1.0)
    if mode == "sequence_mean":
        per_seq = x.sum(-1) / m.sum(-1).clamp(min=1.0)
        n = (m.sum(-1) > 0).float().sum() if num_sequences is None else num_sequences
        return per_seq.sum() / torch.clamp(torch.as_tensor(n, dtype=torch.float32), min=1.0)
    if mode == "constant":
        return x.sum() / constant
    raise ValueError(f"unknown normalization {mode!r}; use token_mean, sequence_mean or constant")


def policy_gradient_token_losses(student_logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-sg(A_t) * log p_student(y_t) per token (Eq. 4-7, 10, 12). [B, T] x [B, T] -> [B, T]."""
    return -advantages.detach().float() * student_logprobs.float()


def opd_loss(
    student_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    topk_kl: torch.Tensor | None = None,
    full_kl: torch.Tensor | None = None,
    pg_coef: float = 1.0,
    topk_kl_coef: float = 0.0,
    full_kl_coef: float = 0.0,
    normalization: Normalization = "token_mean",
    constant: float = 1.0,
    num_tokens: float | torch.Tensor | None = None,
    num_sequences: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The OPD objective from per-token quantities (module doc).

    Args:
        student_logprobs: [B, T] log p_student(y_t), with gradient.
        advantages: [B, T] A_t (treated as constants).
        mask: [B, T] bool distilled tokens (response tokens inside the horizon window).
        topk_kl: [B, T] per-token top-K reverse KL, with gradient, or None.
        full_kl: [B, T] per-token exact full-vocabulary reverse KL (``full_reverse_kl``), with gradient, or None.
    Returns:
        scalar loss.
    """
    per_token = pg_coef * policy_gradient_token_losses(student_logprobs, advantages)
    if topk_kl is not None and topk_kl_coef > 0:
        per_token = per_token + topk_kl_coef * topk_kl.float()
    if full_kl is not None and full_kl_coef > 0:
        per_token = per_token + full_kl_coef * full_kl.float()
    return normalize(
        per_token, mask, normalization, constant=constant, num_tokens=num_tokens, num_sequences=num_sequences
    )


def opd_token_terms_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    topk: int = 0,
    topk_ids_given: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    renormalize: bool = True,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token student terms from (sharded) logits: the path every fused kernel must reproduce.

    Args:
        logits: [N, V/tp] student logits (any float dtype; computed in fp32).
        targets: [N] sampled token ids.
        topk: K for the student top-K strategy (ids chosen here); 0 with ``topk_ids_given`` for the teacher's.
        topk_ids_given: [N, K] ids (teacher top-K strategy), or None.
        teacher_topk_logprobs: [N, K] teacher logprobs at the ids; needed for the KL.
    Returns:
        (student logprobs [N], top-K reverse KL [N] or None, the top-K ids used [N, K] or None)
    """
    logp = token_logprobs(logits, targets, vocab_start, tp_group)
    ids = topk_ids_given
    if ids is None and topk > 0:
        ids = topk_ids(logits, topk, vocab_start, tp_group)
    kl = None
    if ids is not None and teacher_topk_logprobs is not None:
        kl = topk_reverse_kl(
            logprobs_at(logits, ids, vocab_start, tp_group), teacher_topk_logprobs, renormalize
        )
    return logp, kl, ids


def two_model_token_terms_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    topk: int = 0,
    strategy: str = "student",
    renormalize: bool = True,
    full_kl: bool = False,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor | None]:
    """Per-token terms when both models' logits are at hand (the teacher inside the trainer).

    The specification ``loss/two_model.py`` reproduces without either [N, V] block.

    Args:
        student_logits, teacher_logits: [N, V/tp] over the same vocabulary shard (rank r: ids from vocab_start).
        targets: [N] sampled token ids.
        topk: K of the top-K reverse KL (0: none); the ids are the student's K most likely ('student', the paper's
            default) or the teacher's ('teacher'), chosen without gradient.
        full_kl: also return the exact full-vocabulary reverse KL (``full_reverse_kl``).
    Returns:
        {'logp': [N] log p_S(y), with gradient; 'teacher_logp': [N] log p_T(y), no gradient;
         'ids': [N, K] or None; 'topk_kl': [N] or None; 'full_kl': [N] or None (both with gradient)}.
    """
    if strategy not in ("student", "teacher"):
        raise ValueError(f"unknown top-K strategy {strategy!r}; use 'student' or 'teacher'")
    zt = teacher_logits.detach().float()
    out: dict[str, torch.Tensor | None] = {
        "logp": token_logprobs(student_logits, targets, vocab_start, tp_group),
        "teacher_logp": token_logprobs(zt, targets, vocab_start, tp_group),
        "ids": None,
        "topk_kl": None,
        "full_kl": None,
    }
    if topk > 0:
        ids = topk_ids(student_logits if strategy == "student" else zt, topk, vocab_start, tp_group)
        out["ids"] = ids
        out["topk_kl"] = topk_reverse_kl(
            logprobs_at(student_logits, ids, vocab_start, tp_group),
            logprobs_at(zt, ids, vocab_start, tp_group),
            renormalize,
        )
    if full_kl:
        out["full_kl"] = full_reverse_kl(student_logits, zt, tp_group)
    return out
