"""Placeholder for SGLang's `sgl_kernel` on CPU-only machines.

The PyPI `sglang-kernel` wheel is CUDA-only (it fails to load without libnvrtc). With SGLANG_USE_CPU_ENGINE=1 on a CPU
without AMX, SGLang imports names from `sgl_kernel` but falls back to torch-native attention and never calls them
(measured: the team notes shared/notes/sglang-on-cpu.md). So every attribute resolves to a function that raises if it is ever
called: a real call would fail loudly, never silently. The launcher (`megatron_opd/rollout/sglang_server.py`) puts
this folder on the server's PYTHONPATH; nothing else should import it.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is a CPU placeholder (the CUDA sgl_kernel is not installed)"
        )

    _missing.__name__ = name
    return _missing
