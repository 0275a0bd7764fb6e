# One image with the trainer (torch, megatron-core, Transformer-Engine) and the SGLang servers, for Python 3.12 and
# CUDA 13. Build: docker build -t megatron-opd:gpu .   Run: docker run --gpus all --ipc=host -it megatron-opd:gpu
#
# Why this base image: SGLang's own release image for the pinned sglang (0.5.23, CUDA 13). sglang pins
# torch==2.14.1 (requirements/gpu.txt), and this image already holds that torch together with the CUDA-only pieces
# that are hard to assemble (sglang-kernel, flashinfer, the CUDA 13 toolkit with nvcc and cuDNN headers, Python
# 3.12 on a glibc >= 2.34 base, as sglang's manylinux_2_34 wheel needs). An NGC PyTorch image was not taken: its
# torch is NVIDIA's own build (a 2.x.0a0+nv version), which does not satisfy sglang's exact pin, so pip would
# replace it and the image would carry two CUDA stacks. The version checks below stop the build if a base image
# with another torch or Python is substituted.
ARG BASE_IMAGE=lmsysorg/sglang:v0.5.23-cu130
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/megatron-opd
RUN python3 -c "import sys, torch; \
assert sys.version_info[:2] == (3, 12), sys.version; \
assert torch.__version__.startswith('2.14.1'), torch.__version__; \
assert torch.version.cuda.startswith('13'), torch.version.cuda"

# Dependencies first (cached across source edits): the pinned set, then TE compiled against this torch.
COPY requirements/gpu.txt requirements/gpu-te.txt requirements/
RUN python3 -m pip install -r requirements/gpu.txt \
 && python3 -m pip install setuptools wheel ninja "cmake>=3.21" "pybind11[global]" \
 && NVTE_FRAMEWORK=pytorch MAX_JOBS=16 python3 -m pip install --no-build-isolation -r requirements/gpu-te.txt

COPY . .
RUN python3 -m pip install --no-deps -e . \
 && python3 -c "import torch, megatron.core, transformer_engine.pytorch, sglang, megatron_opd; \
assert torch.__version__.startswith('2.14.1'), torch.__version__"

# The acceptance run on one GPU (benchmarks/gpu_check.sh; --dry-run for the CPU version).
CMD ["bash", "benchmarks/gpu_check.sh"]
