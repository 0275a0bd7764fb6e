"""The logged KL-by-position scalars: buckets of [0, T_max), stable keys, empty buckets left out."""

import pytest
import torch

from megatron_opd.loss.metrics import position_bucket_scalars


def test_position_bucket_scalars_bucket_t_max_not_the_window():
    # a window of 5 positions out of T_max = 8, 4 buckets of 2 positions each: bucket 2 is half filled,
    # bucket 3 (positions 6, 7) is past the window
    lr_sum = torch.tensor([-2.0, -4.0, -1.0, -3.0, 6.0], dtype=torch.float64)
    count = torch.tensor([2.0, 2.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    kl_sum = torch.tensor([1.0, 1.0, 0.5, 0.5, 3.0], dtype=torch.float64)
    out = position_bucket_scalars(lr_sum, count, position_topk_kl_sum=kl_sum, max_length=8, num_buckets=4)
    assert out["opd_by_position/log_ratio_b00"] == pytest.approx(-6.0 / 4)
    assert out["opd_by_position/kl_b00"] == pytest.approx(6.0 / 4)  # k1 estimate: -r_t
    assert out["opd_by_position/kl_b01"] == pytest.approx(4.0 / 2)
    assert out["opd_by_position/topk_kl_b01"] == pytest.approx(1.0 / 2)
    assert out["opd_by_position/log_ratio_b02"] == pytest.approx(2.0)
    assert [out[f"opd_by_position/tokens_b{b:02d}"] for b in range(4)] == [4.0, 2.0, 3.0, 0.0]
    assert not any(k.endswith("_b03") and "tokens" not in k for k in out)


def test_position_bucket_scalars_without_topk_and_bad_lengths():
    out = position_bucket_scalars(torch.ones(3), torch.ones(3), max_length=3, num_buckets=3)
    assert not any("topk" in k for k in out)
    assert out["opd_by_position/kl_b02"] == -1.0
    with pytest.raises(ValueError, match="max_response_length"):
        position_bucket_scalars(torch.ones(4), torch.ones(4), max_length=3, num_buckets=3)
