"""Horizon schedules: the paper's formulas, windows, determinism and exact state round-trip."""

import copy
import math

import pytest
import torch

from megatron_opd.algorithms.horizon import (
    AdaptiveHorizon,
    HorizonWindow,
    ProgressiveHorizon,
    SegmentHorizon,
    TruncatedHorizon,
    build_horizon_schedule,
)
from megatron_opd.config import HorizonConfig


def test_full_is_the_whole_response():
    s = build_horizon_schedule(HorizonConfig(schedule="full"), 100)
    assert all(s.window(k) == HorizonWindow(0, 100, 100) for k in (0, 5, 10_000))


@pytest.mark.parametrize("rho, expect", [(0.5, 7680), (0.25, 3840), (0.1, 1536), (1.0, 15360)])
def test_truncated_matches_table_6(rho, expect):
    s = build_horizon_schedule(HorizonConfig(schedule="truncated", rho=rho), 15360)
    assert s.window(0) == s.window(999) == HorizonWindow(0, expect, expect)


def test_truncated_rounds_up_and_never_zero():
    assert TruncatedHorizon(43, 0.1).window(0).end == 5  # ceil(4.3)
    assert TruncatedHorizon(5, 0.01).window(0).end == 1


@pytest.mark.parametrize("h0, dh, dk, T", [(9, 9, 1, 15360), (1, 1, 2, 50), (5, 3, 4, 40), (7, 0, 1, 30)])
def test_progressive_is_eq_11(h0, dh, dk, T):
    s = ProgressiveHorizon(T, h0, dh, dk)
    for k in range(0, 3000, 7):
        h = min(T, h0 + dh * math.floor(k / dk))
        assert s.window(k) == HorizonWindow(0, h, h)


def test_progressive_reaches_and_stays_at_T():
    s = build_horizon_schedule(HorizonConfig(schedule="progressive", h0=1, delta_h=1, delta_k=2), 50)
    assert s.window(0).end == 1 and s.window(2).end == 2 and s.window(97).end == 49 and s.window(98).end == 50
    assert s.window(10_000).end == 50


def test_segment_fraction_and_tokens():
    s = SegmentHorizon(100, 0.2, 0.3)
    w = s.window(0)
    assert (w.start, w.end, w.generate) == (20, 30, 30)  # generation runs to b so the prefix exists
    t = SegmentHorizon(100, 5, 17, unit="tokens")
    assert t.window(3) == HorizonWindow(5, 17, 17)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 10:] = False
    m = w.mask(mask[:, :40])
    assert m[0].nonzero().flatten().tolist() == list(range(20, 30))
    assert not m[1].any()


def test_window_mask_respects_response_mask():
    w = HorizonWindow(0, 4, 4)
    resp = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert w.mask(resp).tolist() == [[True] * 4 + [False] * 2, [True, True] + [False] * 4]


def test_invalid_window_rejected():
    with pytest.raises(ValueError):
        HorizonWindow(3, 3, 3)
    with pytest.raises(ValueError):
        HorizonWindow(0, 5, 4)


def _feed(s, step, per_pos_value, T, count=4.0):
    sig = torch.full((T,), per_pos_value * count, dtype=torch.float64)
    cnt = torch.full((T,), count, dtype=torch.float64)
    s.observe(step, sig, cnt)


def test_adaptive_grows_when_the_tail_signal_is_low_and_respects_patience_and_cap():
    s = AdaptiveHorizon(100, 10, threshold=0.1, window=4, patience=2, growth=5, min_steps_between=3, ema=1.0)
    _feed(s, 0, 0.5, 100)
    assert s.window(1).end == 10  # signal high: no growth
    _feed(s, 1, 0.01, 100)
    assert s.window(2).end == 10  # below once: patience 2 not met
    _feed(s, 2, 0.01, 100)
    assert s.window(3).end == 15  # below twice, 3 steps since start (-1): grows by growth
    _feed(s, 3, 0.01, 100)
    _feed(s, 4, 0.01, 100)
    assert s.window(5).end == 15  # patience met but only 2 steps since the last growth: capped
    _feed(s, 5, 0.01, 100)
    assert s.window(6).end == 20


def test_adaptive_reads_only_the_tail_of_the_current_horizon():
    s = AdaptiveHorizon(100, 10, threshold=0.1, window=4, patience=1, growth=5, ema=1.0)
    sig = torch.zeros(100, dtype=torch.float64)
    cnt = torch.ones(100, dtype=torch.float64)
    sig[6:10] = 1.0  # the last 4 positions of H = 10 disagree; earlier ones are learned
    s.observe(0, sig, cnt)
    assert s.window(1).end == 10
    sig[6:10] = 0.0
    sig[10:] = 5.0  # beyond the horizon: must be ignored
    s.observe(1, sig, cnt)
    assert s.window(2).end == 15


def test_adaptive_floor_forces_growth_and_never_exceeds_T():
    s = AdaptiveHorizon(12, 10, threshold=0.1, window=4, patience=1, growth=5, max_steps_between=2, ema=1.0)
    _feed(s, 0, 9.0, 12)
    assert s.window(1).end == 10
    _feed(s, 1, 9.0, 12)
    assert s.window(2).end == 12  # forced after 2 steps, clipped at T


def test_adaptive_state_round_trip_is_exact_and_replayed_steps_are_ignored():
    cfg = HorizonConfig(
        schedule="adaptive", h0=8, adaptive_threshold=0.2, adaptive_window=3, adaptive_patience=2
    )
    a = build_horizon_schedule(cfg, 64)
    gen = torch.Generator().manual_seed(0)
    for k in range(6):
        _feed(a, k, float(torch.rand((), generator=gen)) * 0.3, 64)
    b = build_horizon_schedule(cfg, 64)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.state_dict() == a.state_dict()
    _feed(b, 5, 0.0, 64)  # step 5 was already observed: no effect
    assert b.state_dict() == a.state_dict()
    for k in range(6, 20):
        v = float(torch.rand((), generator=gen)) * 0.3
        _feed(a, k, v, 64)
        _feed(b, k, v, 64)
        assert a.window(k + 1) == b.window(k + 1)
    assert a.describe(20).keys() == b.describe(20).keys()


def test_state_of_another_schedule_is_refused():
    t = build_horizon_schedule(HorizonConfig(schedule="truncated"), 10)
    p = build_horizon_schedule(HorizonConfig(schedule="progressive", h0=2), 10)
    with pytest.raises(ValueError, match="resume with the same horizon.schedule"):
        p.load_state_dict(t.state_dict())
