"""Placeholder for SGLang's `sgl_kernel` on CPU-only machines.

The PyPI `sglang-kernel` wheel is CUDA-only (it fails to load without libnvrtc). With SGLANG_USE_CPU_ENGINE=1 on a CPU
without AMX, SGLang imports `sgl_kernel` but falls back to torch-native attention and never calls into it, so an
importable empty module is enough (measured: /work/shared/notes/sglang-on-cpu.md). The launcher
(`megatron_opd/rollout/sglang_server.py`) puts this folder on the server's PYTHONPATH; nothing else should import it.
"""
