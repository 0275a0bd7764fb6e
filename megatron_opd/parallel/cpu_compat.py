"""Redirects that let Megatron-core train on a machine without CUDA (tests, CI, laptops).

Why it exists: megatron-core 0.16.1 assumes CUDA in a handful of places (buffer allocation, the pipeline
schedule, the optimizer, the model-parallel RNG tracker). Everything else about it runs on CPU over gloo. This
module holds every redirect in one place, each documented with where Megatron needs it
(measured in the team notes ``shared/notes/megatron-core-on-cpu.md``). ``apply_cpu_compat()`` is idempotent and does
nothing when CUDA is available, so GPU runs never see any of it.

The redirects:
1. ``torch.cuda.current_device()`` -> the CPU device (Megatron allocates many buffers with
   ``device=torch.cuda.current_device()``).
2. ``torch.cuda.synchronize()`` -> no-op (pipeline send/recv synchronizes after batched p2p).
3. Hard-coded ``device="cuda"`` factory calls and ``Tensor.cuda()`` (pipeline schedules, optimizer, grad
   clipping) -> CPU, through a global ``TorchFunctionMode``.
4. ``Tensor.type()`` (no argument) reports the CUDA type name (``'torch.cuda.FloatTensor'``) inside that mode:
   grad clipping, bf16 params and the distributed optimizer assert on it.
5. The model-parallel RNG tracker (attention always forks it, even with dropout 0) -> a tracker whose named
   states are states of the CPU generator.
6. The CUDA RNG get/set used by activation recompute -> the CPU generator's get/set.
7. Activation recompute re-runs the forward inside autograd's backward, where Python function modes are not
   active: its backward is wrapped to re-enter the redirect mode (the causal mask is built with device="cuda").
8. Triton kernels -> Triton's interpreter (``TRITON_INTERPRET=1``, ``use_triton_interpreter()``), so the fused
   loss kernels run on CPU tensors (slow: for tests). Triton reads the variable when it is first imported, and
   megatron.core imports it, so this one is applied before anything imports Megatron (``tests/conftest.py``,
   ``loss/triton_kernels.py``), not by ``apply_cpu_compat()``.

The mode of 3-4 is entered on the thread that applies the redirects (the training thread); Megatron code run
from another thread would not see it. It intercepts every torch call made while it is active (a Python call
each, about a third of a small decode step's cost on CPU), so pure-torch code that never reaches Megatron (the
embedded rollout engine and teacher, evaluation) runs under ``redirects_paused()``, which takes the mode off the
stack for its duration.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_APPLIED = False
_MODE: TorchFunctionMode | None = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects 3 and 4: ``device='cuda'`` -> CPU, ``Tensor.cuda()`` -> self, ``Tensor.type()`` -> CUDA name."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _install_cpu_rng_tracker() -> None:
    """Redirects 5 and 6: Megatron's RNG tracker and recompute RNG hooks on the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Named RNG states of the CPU generator; ``fork`` swaps them in and out as the CUDA tracker does."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _wrap_recompute_backward() -> None:
    """Redirect 7: re-enter the redirect mode around the recompute forward that runs during backward."""
    from megatron.core.tensor_parallel import random as mrandom

    def with_mode(backward):
        def wrapped(ctx, *grads):
            if any(isinstance(m, _CudaToCpuMode) for m in torch.overrides._get_current_function_mode_stack()):
                return backward(ctx, *grads)
            with _CudaToCpuMode():
                return backward(ctx, *grads)

        return staticmethod(wrapped)

    for fn in (mrandom.CheckpointFunction, mrandom.CheckpointWithoutOutputFunction):
        fn.backward = with_mode(fn.backward)


def reset_cpu_rng_tracker() -> None:
    """Re-install a fresh CPU tracker (Megatron's ``force_reset_rng`` would bring back the CUDA one)."""
    if _APPLIED:
        _install_cpu_rng_tracker()


def apply_cpu_compat() -> bool:
    """Apply every redirect when CUDA is absent; returns whether they are active. Idempotent."""
    global _APPLIED, _MODE
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")  # 1
    torch.cuda.synchronize = lambda *a, **k: None  # 2
    _MODE = _CudaToCpuMode()  # 3, 4
    _MODE.__enter__()
    _install_cpu_rng_tracker()  # 5, 6
    _wrap_recompute_backward()  # 7
    _APPLIED = True
    logger.info("CUDA is absent: Megatron-core CPU redirects applied (megatron_opd.parallel.cpu_compat)")
    return True


@contextlib.contextmanager
def redirects_paused() -> Iterator[None]:
    """Run the body without the redirect mode of 3-4 (a no-op when it is not the innermost active mode).

    Only for code that never calls into Megatron-core: a ``device="cuda"`` in it would fail, not go to CPU.
    """
    stack = torch.overrides._get_current_function_mode_stack()
    if _MODE is None or not stack or stack[-1] is not _MODE:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


F = TypeVar("F", bound=Callable[..., Any])


def without_redirects(fn: F) -> F:
    """Decorator form of ``redirects_paused`` for pure-torch methods (engines, scorers)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with redirects_paused():
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def cpu_compat_active() -> bool:
    """Whether ``apply_cpu_compat`` has installed the redirects in this process."""
    return _APPLIED


def use_triton_interpreter() -> None:
    """Redirect 8: without CUDA, run Triton kernels in Triton's interpreter (an explicit setting wins)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
