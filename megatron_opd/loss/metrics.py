"""Per-token diagnostics of distillation, reduced by response-position bucket for the logs.

Why it exists: the paper's analysis (Fig. 13) is about *where* in the response the teacher and student
disagree. These helpers turn per-token quantities (log-ratio, top-K KL, entropy) into overall means and
means per response-position bucket, plus the per-position sums the adaptive horizon schedule consumes.

Buckets are ``num_buckets`` equal-width slices of [0, T_max) (``rollout.max_response_length``), not of the
step's window: bucket b always covers the same response positions, so the curves of a run whose horizon
grows (POPD) or stays short (TOPD) are comparable step to step and with full OPD. The price: buckets past
the horizon get no tokens (a TOPD run with rho = 0.1 and 10 buckets only fills bucket 0); they are left out
of the scalars rather than logged as NaN.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` [B, T] over ``mask`` [B, T]; NaN when the mask is empty."""
    m = mask.bool()
    n = int(m.sum())
    return float(values.detach().float()[m].sum() / n) if n else float("nan")


def position_sums(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position sums and token counts over the batch: [B, T] -> ([T], [T]) float64."""
    m = mask.bool()
    v = torch.where(m, values.detach().double(), torch.zeros((), dtype=torch.float64, device=values.device))
    return v.sum(0), m.double().sum(0)


def bucket_sums(
    sums: torch.Tensor, counts: torch.Tensor, max_length: int, num_buckets: int
) -> tuple[list[float], list[float]]:
    """Per-position sums and counts [P] (position p = response index p < max_length) -> per-bucket sums and
    counts, ``num_buckets`` each; position p falls in bucket floor(p * num_buckets / max_length)."""
    if sums.shape != counts.shape or sums.dim() != 1:
        raise ValueError(f"sums and counts must be matching 1-D tensors, got {sums.shape} and {counts.shape}")
    if sums.shape[0] > max_length:
        raise ValueError(
            f"{sums.shape[0]} positions do not fit in max_length={max_length}: pass the run's T_max "
            "(rollout.max_response_length)"
        )
    P = sums.shape[0]
    bucket = (
        (torch.arange(P, dtype=torch.float64) * num_buckets / max_length).long().clamp(max=num_buckets - 1)
    )
    bsum = torch.zeros(num_buckets, dtype=torch.float64).index_add_(0, bucket, sums.detach().double().cpu())
    bcnt = torch.zeros(num_buckets, dtype=torch.float64).index_add_(0, bucket, counts.detach().double().cpu())
    return bsum.tolist(), bcnt.tolist()


def position_bucket_means(
    values: torch.Tensor, mask: torch.Tensor, max_length: int, num_buckets: int
) -> list[float]:
    """Mean of ``values`` in each of ``num_buckets`` equal slices of positions [0, max_length).

    Args:
        values: [B, T] per-token values (T <= max_length; positions are response indices).
        mask: [B, T] bool tokens to count.
    Returns:
        ``num_buckets`` floats, NaN for buckets without tokens.
    """
    bsum, bcnt = bucket_sums(*position_sums(values, mask), max_length, num_buckets)
    return [s / c if c > 0 else float("nan") for s, c in zip(bsum, bcnt)]


def position_bucket_scalars(
    position_log_ratio_sum: torch.Tensor,
    position_count: torch.Tensor,
    *,
    position_topk_kl_sum: torch.Tensor | None = None,
    max_length: int,
    num_buckets: int,
    prefix: str = "opd_by_position",
) -> dict[str, float]:
    """The logged KL-by-position scalars of one step, from its per-position sums (``StepResult.position_*``).

    Args:
        position_log_ratio_sum: [P] sum over the batch of r_t = log p_teacher(y_t) - log p_student(y_t) at each
            response position p (P = the window's end, <= max_length).
        position_count: [P] distilled tokens at each position.
        position_topk_kl_sum: [P] sum of the top-K reverse KL at each position, or None when the loss has none.
        max_length: T_max; buckets are equal slices of [0, max_length) (module docstring).
        num_buckets: ``logging.kl_position_buckets``.
    Returns:
        For each bucket b with tokens (``bb`` = b as two digits, stable key names): ``{prefix}/log_ratio_bbb``
        (mean r_t), ``{prefix}/kl_bbb`` (mean -r_t, the sampled-token k1 estimate of KL(student || teacher)),
        ``{prefix}/topk_kl_bbb`` (mean top-K KL, when given); for every bucket ``{prefix}/tokens_bbb``.
    """
    lr_sum, cnt = bucket_sums(position_log_ratio_sum, position_count, max_length, num_buckets)
    kl_sum = None
    if position_topk_kl_sum is not None:
        kl_sum, _ = bucket_sums(position_topk_kl_sum, position_count, max_length, num_buckets)
    out: dict[str, float] = {}
    for b in range(num_buckets):
        out[f"{prefix}/tokens_b{b:02d}"] = cnt[b]
        if cnt[b] <= 0:
            continue
        out[f"{prefix}/log_ratio_b{b:02d}"] = lr_sum[b] / cnt[b]
        out[f"{prefix}/kl_b{b:02d}"] = -lr_sum[b] / cnt[b]
        if kl_sum is not None:
            out[f"{prefix}/topk_kl_b{b:02d}"] = kl_sum[b] / cnt[b]
    return out


def distillation_metrics(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    topk_kl: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    max_length: int,
    num_buckets: int = 10,
    prefix: str = "opd",
) -> dict[str, float]:
    """Scalars for the logs: mean log-ratio, sampled-token KL estimate, top-K KL and entropy, overall and by
    position bucket (the keys of ``position_bucket_scalars`` under ``{prefix}_by_position/``, plus
    ``entropy_bbb``). All inputs [B, T] over response positions; ``mask`` selects distilled tokens."""
    out: dict[str, float] = {
        f"{prefix}/log_ratio_mean": masked_mean(log_ratio, mask),
        f"{prefix}/tokens": float(mask.bool().sum()),
    }
    lr_sum, count = position_sums(log_ratio, mask)
    kl_sum = None
    if topk_kl is not None:
        out[f"{prefix}/topk_kl_mean"] = masked_mean(topk_kl, mask)
        kl_sum, _ = position_sums(topk_kl, mask)
    out.update(
        position_bucket_scalars(
            lr_sum,
            count,
            position_topk_kl_sum=kl_sum,
            max_length=max_length,
            num_buckets=num_buckets,
            prefix=f"{prefix}_by_position",
        )
    )
    if entropy is not None:
        out[f"{prefix}/entropy_mean"] = masked_mean(entropy, mask)
        for b, v in enumerate(position_bucket_means(entropy, mask, max_length, num_buckets)):
            if v == v:
                out[f"{prefix}_by_position/entropy_b{b:02d}"] = v
    return out
