"""Install megatron-opd.

CPU machines: ``pip install -r requirements/cpu.txt -e '.[dev]'`` (the pinned torch is the CPU build).
GPU clusters (Python 3.12, CUDA 13): ``make gpu-env``, i.e. ``pip install -r requirements/gpu.txt -e .`` and then
``pip install --no-build-isolation -r requirements/gpu-te.txt`` (Transformer-Engine compiles against that torch).
"""

from setuptools import find_packages, setup

setup(
    name="megatron-opd",
    version="0.1.0",
    description="On-policy distillation with rollout-horizon control (OPD, POPD, TOPD) on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_opd", "megatron_opd.*"]),
    package_data={"megatron_opd": ["eval/benchmarks/*.jsonl", "eval/benchmarks/*.md"]},
    install_requires=[
        # torch is deliberately unpinned here: pin it in requirements/{cpu,gpu}.txt for the target machine.
        "torch>=2.5",
        "megatron-core>=0.16.1",
        "psutil",  # megatron-core's checkpoint saving needs it but does not declare it
        "tqdm",  # likewise, for its inference engine; also our progress bars
        "numpy",
        "pyyaml",
        "safetensors",
        "transformers>=4.45",
        "tokenizers",
        "sentencepiece",
        "tensorboard",
        "pyarrow",
        "math-verify",
        "requests",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "ruff", "matplotlib", "triton==3.7.1"],
        # The ranges requirements/gpu*.txt pin inside: torch 2.14.1's triton, megatron-core 0.16.1's TE range.
        # Install TE with --no-build-isolation (requirements/gpu-te.txt says why), or use `make gpu-env`.
        "gpu": ["triton~=3.8.0", "transformer-engine[pytorch]>=2.9,<2.12"],
        "plot": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "opd-train=megatron_opd.training.main:main",
        ]
    },
)
