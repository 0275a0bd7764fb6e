"""Per-token diagnostics of distillation, reduced by response-position bucket for the logs.

Why it exists: the paper's analysis (Fig. 13) is about *where* in the response the teacher and student
disagree. These helpers turn per-token quantities (log-ratio, top-K KL, entropy) into overall means and
means per equal-width position bucket of [0, T_max), plus the per-position sums the adaptive horizon
schedule consumes.
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
    sums, counts = position_sums(values, mask)
    T = sums.shape[0]
    bucket = (
        (torch.arange(T, dtype=torch.float64) * num_buckets / max_length).long().clamp(max=num_buckets - 1)
    )
    bsum = torch.zeros(num_buckets, dtype=torch.float64).index_add_(0, bucket, sums.cpu())
    bcnt = torch.zeros(num_buckets, dtype=torch.float64).index_add_(0, bucket, counts.cpu())
    return [float(s / c) if c > 0 else float("nan") for s, c in zip(bsum.tolist(), bcnt.tolist())]


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
    position bucket. All inputs [B, T] over response positions; ``mask`` selects distilled tokens."""
    out: dict[str, float] = {
        f"{prefix}/log_ratio_mean": masked_mean(log_ratio, mask),
        f"{prefix}/tokens": float(mask.bool().sum()),
    }
    series = {"log_ratio": log_ratio}
    if topk_kl is not None:
        out[f"{prefix}/topk_kl_mean"] = masked_mean(topk_kl, mask)
        series["topk_kl"] = topk_kl
    if entropy is not None:
        out[f"{prefix}/entropy_mean"] = masked_mean(entropy, mask)
        series["entropy"] = entropy
    for name, values in series.items():
        for i, v in enumerate(position_bucket_means(values, mask, max_length, num_buckets)):
            out[f"{prefix}_by_position/{name}_{i:02d}"] = v
    return out
