"""Horizon schedules: which token window of each response is generated and distilled at step k.

Why it exists: the rollout horizon is the paper's lever on cost. Every consumer (the rollout engine's
``max_new_tokens``, the teacher's scoring length, the loss mask, the logs) reads the same ``HorizonWindow`` from
one schedule, so they can never disagree. Schedules are pure functions of the step and of what they observed,
report their state for logging and save/restore it exactly for resume.

Schedules (T = ``max_response_length``):
- ``full``: standard OPD, window [0, T) every step (Eq. 6).
- ``truncated``: TOPD, window [0, H) with H = ceil(rho * T) (Eq. 12).
- ``progressive``: POPD, window [0, H_k) with H_k = min(T, H0 + dH * floor(k / dk)) (Eq. 10-11).
- ``segment``: the ablation of Section 6.3: distil only [a, b) while generating up to b.
- ``adaptive``: beyond the paper (its Section 8): start at H0 and grow by ``growth`` tokens once the current
  prefix looks learned. The signal is, per step, the mean over the last ``window`` positions of the current
  horizon of either the top-K reverse KL ('kl') or the sampled-token KL estimate -r_t ('log_ratio', the k1
  estimator of KL(student || teacher)). Its exponential moving mean (weight ``ema`` on the newest step) must stay
  below ``threshold`` for ``patience`` consecutive steps; growths are at least ``min_steps_between`` steps apart
  (the cap on the growth rate), and ``max_steps_between``, when set, forces a growth after that many steps
  without one (the floor on the growth rate), so the schedule always reaches T. H never falls below H0.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import torch

from megatron_opd.config.tree import HorizonConfig


@dataclass(frozen=True)
class HorizonWindow:
    """Response positions [start, end) are distilled; generation runs for ``generate`` new tokens (>= end)."""

    start: int
    end: int
    generate: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.generate:
            raise ValueError(f"invalid horizon window {self}: need 0 <= start < end <= generate")

    @property
    def length(self) -> int:
        return self.end - self.start

    def mask(self, response_mask: torch.Tensor) -> torch.Tensor:
        """Restrict ``response_mask`` [B, T] (True on real response tokens) to the window; returns [B, T] bool."""
        positions = torch.arange(response_mask.shape[-1], device=response_mask.device)
        inside = (positions >= self.start) & (positions < self.end)
        return response_mask.bool() & inside


class HorizonSchedule(ABC):
    """Maps the training step (and, for adaptive schedules, observed signals) to a ``HorizonWindow``."""

    name: str = ""

    def __init__(self, max_response_length: int) -> None:
        if max_response_length < 1:
            raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")
        self.max_response_length = max_response_length

    @abstractmethod
    def window(self, step: int) -> HorizonWindow:
        """The window used at optimizer step ``step`` (0-based)."""

    def observe(self, step: int, position_signal: torch.Tensor, position_count: torch.Tensor) -> None:
        """Feed step ``step``'s per-position signal sums [T'] and token counts [T'] (absolute positions).

        Only the adaptive schedule uses it; the others are fixed in advance.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(
                f"checkpoint holds the state of horizon schedule '{state.get('name')}', but this run uses "
                f"'{self.name}'; resume with the same horizon.schedule or start a new run"
            )

    def describe(self, step: int, window: HorizonWindow | None = None) -> dict[str, float]:
        """Scalars for the logs at ``step``: ``window``, the one the step used (a rollout phase's steps share its
        first step's, ``train.steps_per_rollout``), by default ``window(step)``."""
        w = self.window(step) if window is None else window
        return {
            "horizon/start": float(w.start),
            "horizon/end": float(w.end),
            "horizon/generate": float(w.generate),
            "horizon/fraction": w.end / self.max_response_length,
        }


class FullHorizon(HorizonSchedule):
    """Standard (token-level) OPD: every position of the full rollout, Eq. (6)."""

    name = "full"

    def window(self, step: int) -> HorizonWindow:
        T = self.max_response_length
        return HorizonWindow(0, T, T)


class TruncatedHorizon(HorizonSchedule):
    """TOPD, Eq. (12): generate and distil the first H = ceil(rho * T_max) tokens, always."""

    name = "truncated"

    def __init__(self, max_response_length: int, rho: float) -> None:
        super().__init__(max_response_length)
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {rho}")
        self.rho = rho
        # The small epsilon keeps e.g. 0.1 * 15360 at exactly 1536 despite binary rounding.
        self.horizon = max(1, min(max_response_length, math.ceil(rho * max_response_length - 1e-9)))

    def window(self, step: int) -> HorizonWindow:
        return HorizonWindow(0, self.horizon, self.horizon)


class ProgressiveHorizon(HorizonSchedule):
    """POPD, Eq. (11): H_k = min(T, H0 + dH * floor(k / dk))."""

    name = "progressive"

    def __init__(self, max_response_length: int, h0: int, delta_h: int, delta_k: int) -> None:
        super().__init__(max_response_length)
        if h0 < 1 or delta_h < 0 or delta_k < 1:
            raise ValueError(f"need h0 >= 1, delta_h >= 0, delta_k >= 1; got {h0}, {delta_h}, {delta_k}")
        self.h0, self.delta_h, self.delta_k = h0, delta_h, delta_k

    def horizon(self, step: int) -> int:
        return min(self.max_response_length, self.h0 + self.delta_h * (step // self.delta_k))

    def window(self, step: int) -> HorizonWindow:
        h = self.horizon(step)
        return HorizonWindow(0, h, h)


class SegmentHorizon(HorizonSchedule):
    """Section 6.3 ablation: distil only positions [a, b); generation still runs to b so the prefix exists."""

    name = "segment"

    def __init__(self, max_response_length: int, start: float, end: float, unit: str = "fraction") -> None:
        super().__init__(max_response_length)
        T = max_response_length
        if unit == "fraction":
            a, b = round(start * T), round(end * T)
        elif unit == "tokens":
            a, b = int(start), int(end)
        else:
            raise ValueError(f"segment unit must be 'fraction' or 'tokens', got {unit!r}")
        b = min(T, max(b, a + 1))
        if not 0 <= a < b:
            raise ValueError(f"segment [{start}, {end}) ({unit}) is empty for T = {T}")
        self.start, self.end = a, b

    def window(self, step: int) -> HorizonWindow:
        return HorizonWindow(self.start, self.end, self.end)


class AdaptiveHorizon(HorizonSchedule):
    """Grow H when the signal over the tail of the current horizon says the prefix is learned (module doc)."""

    name = "adaptive"

    def __init__(
        self,
        max_response_length: int,
        h0: int,
        *,
        threshold: float,
        window: int,
        patience: int,
        growth: int,
        min_steps_between: int = 1,
        max_steps_between: int | None = None,
        ema: float = 0.5,
    ) -> None:
        super().__init__(max_response_length)
        self.h0 = min(h0, max_response_length)
        self.threshold, self.tail, self.patience, self.growth = threshold, window, patience, growth
        self.min_steps_between, self.max_steps_between, self.ema_weight = (
            min_steps_between,
            max_steps_between,
            ema,
        )
        self._horizon = self.h0
        self._ema: float | None = None
        self._below = 0
        self._last_growth_step = -1
        self._last_observed_step = -1

    def window(self, step: int) -> HorizonWindow:
        return HorizonWindow(0, self._horizon, self._horizon)

    def observe(self, step: int, position_signal: torch.Tensor, position_count: torch.Tensor) -> None:
        if step <= self._last_observed_step:
            return  # a replayed step (e.g. after resume) must not be counted twice
        self._last_observed_step = step
        h = self._horizon
        lo = max(0, h - self.tail)
        sig = position_signal.detach().double().flatten()[lo:h].sum().item()
        cnt = position_count.detach().double().flatten()[lo:h].sum().item()
        if cnt > 0:
            value = sig / cnt
            self._ema = (
                value if self._ema is None else self.ema_weight * value + (1 - self.ema_weight) * self._ema
            )
            self._below = self._below + 1 if self._ema < self.threshold else 0
        since = step - self._last_growth_step
        learned = self._below >= self.patience and since >= self.min_steps_between
        forced = self.max_steps_between is not None and since >= self.max_steps_between
        if h < self.max_response_length and (learned or forced):
            self._horizon = min(self.max_response_length, h + self.growth)
            self._ema, self._below, self._last_growth_step = None, 0, step

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "horizon": self._horizon,
            "ema": self._ema,
            "below": self._below,
            "last_growth_step": self._last_growth_step,
            "last_observed_step": self._last_observed_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._horizon = int(state["horizon"])
        self._ema = None if state["ema"] is None else float(state["ema"])
        self._below = int(state["below"])
        self._last_growth_step = int(state["last_growth_step"])
        self._last_observed_step = int(state["last_observed_step"])

    def describe(self, step: int, window: HorizonWindow | None = None) -> dict[str, float]:
        out = super().describe(step, window)
        out["horizon/adaptive_signal_ema"] = float("nan") if self._ema is None else self._ema
        out["horizon/adaptive_steps_below"] = float(self._below)
        return out


def build_horizon_schedule(cfg: HorizonConfig, max_response_length: int) -> HorizonSchedule:
    """The schedule named by ``cfg.schedule`` for responses of at most ``max_response_length`` tokens."""
    T = max_response_length
    if cfg.schedule == "full":
        return FullHorizon(T)
    if cfg.schedule == "truncated":
        return TruncatedHorizon(T, cfg.rho)
    if cfg.schedule == "progressive":
        return ProgressiveHorizon(T, cfg.h0, cfg.delta_h, cfg.delta_k)
    if cfg.schedule == "segment":
        return SegmentHorizon(T, cfg.segment_start, cfg.segment_end, cfg.segment_unit)
    if cfg.schedule == "adaptive":
        return AdaptiveHorizon(
            T,
            cfg.h0,
            threshold=cfg.adaptive_threshold,
            window=cfg.adaptive_window,
            patience=cfg.adaptive_patience,
            growth=cfg.adaptive_growth,
            min_steps_between=cfg.adaptive_min_steps_between,
            max_steps_between=cfg.adaptive_max_steps_between,
            ema=cfg.adaptive_ema,
        )
    raise ValueError(f"unknown horizon schedule {cfg.schedule!r}")


def schedule_summary(cfg: HorizonConfig) -> dict[str, Any]:
    """The config fields that matter for ``cfg.schedule``, for the start-up log."""
    d = asdict(cfg)
    keep = {
        "full": [],
        "truncated": ["rho"],
        "progressive": ["h0", "delta_h", "delta_k"],
        "segment": ["segment_start", "segment_end", "segment_unit"],
        "adaptive": [k for k in d if k.startswith("adaptive_")] + ["h0"],
    }[cfg.schedule]
    return {"schedule": cfg.schedule, **{k: d[k] for k in keep}}
