"""The diagonal-Gaussian action head shared by every control policy, and its log-probability.

Why it exists: in the control tasks the "token" is a continuous 2D action, and the OPD log-ratio r_t is a
difference of Gaussian log-densities. Keeping the parameterisation (squashed mean, bounded log-std) and the
log-density in one place guarantees teacher and student are scored by the same formula.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def gaussian_logprob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, diag(exp(log_std))^2) summed over the action dimension.

    Args:
        actions, mean, log_std: [..., A].
    Returns:
        [...] float32 log-densities (the continuous analogue of a token log-prob).
    """
    a, m, s = actions.float(), mean.float(), log_std.float()
    z = (a - m) * torch.exp(-s)
    return (-0.5 * z.pow(2) - s - 0.5 * math.log(2 * math.pi)).sum(-1)


class GaussianHead(nn.Module):
    """Linear mean and log-std heads (Tables 4, 5): mean = scale * tanh(.), std squashed into
    [min_std, 1] * scale.

    The floor matters: REINFORCE drives the std to it, and a mismatched student's log-ratio under a teacher of
    std sigma is about -(bias / sigma)^2 / 2 per step. With a narrow teacher (min_std = 0.05) the per-step r_t
    of the simple task reached -100 and sequence-level OPD (the sum of up to 50 of them) learned nothing in
    200 steps, nor did it under the analytic teacher with std 0.1; the simple task therefore uses 0.5
    (docs/control_reproduction.md).
    """

    def __init__(self, hidden: int, action_dim: int, scale: float, min_std: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < min_std < 1.0:
            raise ValueError(f"min_std must be in (0, 1), got {min_std}")
        self.mean = nn.Linear(hidden, action_dim)
        self.log_std = nn.Linear(hidden, action_dim)
        self.scale = scale
        self.log_low = math.log(min_std)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [..., hidden] -> (mean [..., A], log_std [..., A])."""
        mean = self.scale * torch.tanh(self.mean(h))
        unit = 0.5 * (torch.tanh(self.log_std(h)) + 1.0)
        log_std = math.log(self.scale) + self.log_low * (1.0 - unit)
        return mean, log_std
