"""OPD advantages: the per-token log-ratio and its discounted return-to-go.

Why it exists: the paper's variants differ only in how the per-token log-ratio r_t is turned into the weight
A_t of the score function s_t = grad log p_student(y_t):

- r_t = log p_teacher(y_t | y_<t, x) - log p_student(y_t | y_<t, x)                               (Eq. 1)
- token-level OPD (gamma = 0):       A_t = r_t                                                      (Eq. 6)
- discounted OPD (0 < gamma < 1):    A_t = sum_{k >= t} gamma^(k - t) r_k                           (Eq. 5)
- sequence-level OPD (gamma = 1):    A_t = sum_{k >= t} r_k                                         (Eq. 4, 7)

Sums run only over positions inside ``mask`` (the response tokens of the current horizon window): tokens
outside it contribute nothing and get A_t = 0. Everything is O(T) per sequence and batched.
"""

from __future__ import annotations

import torch


def log_ratio(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """r_t of Eq. (1), zero outside ``mask``.

    Args:
        teacher_logprobs: [B, T] log p_teacher(y_t) of the sampled tokens.
        student_logprobs: [B, T] log p_student(y_t) of the same tokens (detached by the caller if needed).
        mask: [B, T] bool, True where the token is a real response token inside the horizon window.
    Returns:
        [B, T] float32 log-ratio.
    """
    r = teacher_logprobs.float() - student_logprobs.float()
    return torch.where(mask.bool(), r, torch.zeros_like(r))


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return-to-go A_t = sum_{k >= t, k in mask} gamma^(k - t) r_k (Eq. 5; Eq. 4/7 at gamma = 1, Eq. 6 at 0).

    The exponent counts positions, not masked tokens, so a gap in the mask (which OPD windows never have,
    but padding might) still discounts by distance. O(T) per sequence.

    Args:
        rewards: [B, T] per-token signals r_t.
        mask: [B, T] bool; positions outside contribute nothing and receive 0.
        gamma: discount in [0, 1].
    Returns:
        [B, T] float32 advantages.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    m = mask.bool()
    r = torch.where(m, rewards.float(), torch.zeros((), dtype=torch.float32, device=rewards.device))
    if gamma == 0.0:
        return r
    if gamma == 1.0:
        out = r.flip(-1).cumsum(-1).flip(-1)
    else:
        out = torch.empty_like(r)
        running = torch.zeros(r.shape[:-1], dtype=torch.float32, device=r.device)
        for t in range(r.shape[-1] - 1, -1, -1):
            running = r[..., t] + gamma * running
            out[..., t] = running
    return torch.where(m, out, torch.zeros_like(out))


def opd_advantages(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Advantages of the OPD policy gradient for discount ``gamma`` (Eq. 4-7), detached, [B, T] float32."""
    r = log_ratio(teacher_logprobs.detach(), student_logprobs.detach(), mask)
    return discounted_returns(r, mask, gamma)
