"""Parallel start-up in one process, and the CPU redirects (only active without CUDA)."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from megatron_opd.config.base import ConfigError
from megatron_opd.config.tree import ParallelConfig
from megatron_opd.parallel import cpu_compat
from megatron_opd.parallel.state import initialize_parallel

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-absent path"),
    pytest.mark.usefixtures("own_process_group"),
]


def test_initialize_single_process_and_redirects() -> None:
    info = initialize_parallel(ParallelConfig(), seed=7)
    assert (info.world_size, info.tp_size, info.pp_size, info.dp_size) == (1, 1, 1, 1)
    assert info.backend == "gloo" and info.device == torch.device("cpu")
    assert mpu.model_parallel_is_initialized() and cpu_compat.cpu_compat_active()
    # Redirects 1-4: what Megatron's code does on a GPU now lands on the CPU.
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    # Redirect 5: forking the model-parallel RNG state gives a separate, reproducible stream and restores ours.
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    torch.testing.assert_close(torch.get_rng_state(), before, rtol=0, atol=0)
    initialize_parallel(ParallelConfig(), seed=7)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_redirects_paused_takes_the_mode_off_and_puts_it_back() -> None:
    initialize_parallel(ParallelConfig(), seed=7)
    assert cpu_compat.cpu_compat_active()
    with cpu_compat.redirects_paused():
        # Pure-torch code (the embedded engine and teacher) runs without the per-call interception...
        assert not any(
            isinstance(m, cpu_compat._CudaToCpuMode)
            for m in torch.overrides._get_current_function_mode_stack()
        )
        assert torch.ones(1).type() == "torch.FloatTensor"
    # ...and Megatron's redirects are back afterwards, also after an exception inside.
    with pytest.raises(RuntimeError, match="inside"), cpu_compat.redirects_paused():
        raise RuntimeError("inside")
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert cpu_compat.without_redirects(lambda: torch.ones(1).type())() == "torch.FloatTensor"


def test_initialize_rejects_layout_larger_than_world() -> None:
    with pytest.raises(ConfigError, match="not divisible"):
        initialize_parallel(ParallelConfig(tensor_model_parallel_size=2), seed=0)
