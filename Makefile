# Developer entry points. `make setup` builds .venv (CPU torch pinned); `make test` runs the whole suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup sglang-env router-env trl-env gpu-env test test-fast lint format bench bench-peers gpu-check gpu-check-dry-run clean

setup: $(STAMP)

$(STAMP): setup.py requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements/cpu.txt -e '.[dev]'
	touch $(STAMP)

# SGLang server environment, separate from the trainer's .venv (facts: the team notes shared/notes/sglang-on-cpu.md).
# torch 2.14.1 + torchvision 0.29.1 come from the machine's local wheel index; sglang itself without its CUDA deps;
# the placeholder sgl_kernel lies in requirements/sglang_stubs (the launcher puts it on PYTHONPATH).
SGL_VENV := .venv-sglang
SGL_STAMP := $(SGL_VENV)/.installed
sglang-env: $(SGL_STAMP)

$(SGL_STAMP): requirements/sglang.txt requirements/sglang-constraints.txt
	$(PY) -m venv $(SGL_VENV)
	$(SGL_VENV)/bin/python -m pip install -q --upgrade pip
	$(SGL_VENV)/bin/python -m pip install -q -c requirements/sglang-constraints.txt torch==2.14.1 torchvision==0.29.1
	$(SGL_VENV)/bin/python -m pip install -q --no-deps sglang==0.5.23
	$(SGL_VENV)/bin/python -m pip install -q -c requirements/sglang-constraints.txt -r requirements/sglang.txt
	PYTHONPATH=requirements/sglang_stubs SGLANG_USE_CPU_ENGINE=1 $(SGL_VENV)/bin/python -c "import sglang.srt.entrypoints.http_server"
	touch $(SGL_STAMP)

# GPU environment (Python 3.12, CUDA 13 driver, nvcc + cuDNN headers for Transformer-Engine's build): torch, triton,
# megatron-core, transformers and sglang pinned in requirements/gpu.txt, then Transformer-Engine compiled against
# that torch without build isolation (requirements/gpu-te.txt says why). The Dockerfile builds the same set.
PY312 ?= python3.12
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
gpu-env: $(GPU_STAMP)

$(GPU_STAMP): setup.py requirements/gpu.txt requirements/gpu-te.txt
	$(PY312) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -r requirements/gpu.txt -e .
	$(GPU_VENV)/bin/python -m pip install -q setuptools wheel ninja "cmake>=3.21" "pybind11[global]"
	NVTE_FRAMEWORK=pytorch MAX_JOBS=$${MAX_JOBS:-8} \
	  $(GPU_VENV)/bin/python -m pip install -q --no-build-isolation -r requirements/gpu-te.txt
	$(GPU_VENV)/bin/python -c "import torch, triton, megatron.core, transformer_engine.pytorch, sglang; \
	  assert torch.__version__.startswith('2.14.1') and torch.version.cuda.startswith('13'), torch.__version__; \
	  print('gpu-env: torch', torch.__version__, 'triton', triton.__version__, 'sglang', sglang.__version__)"
	touch $(GPU_STAMP)

# sglang-router (SGLang's load balancer, a compiled binary with no torch) in its own small environment, for the
# miniature-cluster test of a router URL used as a server (tests/e2e/test_cluster_miniature.py).
ROUTER_STAMP := .venv-router/.installed
router-env: $(ROUTER_STAMP)

$(ROUTER_STAMP):
	$(PY) -m venv .venv-router
	.venv-router/bin/python -m pip install -q sglang-router==0.3.2
	touch $(ROUTER_STAMP)

# The whole suite; exit code 5 (no tests collected) is a failure, not a pass.
test: setup sglang-env router-env
	$(VPY) -m pytest tests -q -rs --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: setup
	$(VPY) -m pytest tests/unit -q -x

# ruff, and no absolute path of one machine in the tracked files (the repository reads the same anywhere).
lint: setup
	$(VPY) -m ruff check . && $(VPY) -m ruff format --check .
	@if git grep -nE '/(work|root|home)/[A-Za-z]' -- ':!Makefile'; then echo "absolute machine paths above: remove them"; exit 1; fi

format: setup
	$(VPY) -m ruff format . && $(VPY) -m ruff check --fix .

bench: setup
	$(VPY) benchmarks/bench_loss.py
	$(VPY) benchmarks/bench_rollout.py

# The peer framework for benchmarks/bench_peers.py: Hugging Face TRL in its own environment (requirements/trl.txt;
# torch pinned so pip takes the local CPU wheel). The comparison itself runs from the trainer's .venv.
TRL_VENV := .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed
trl-env: $(TRL_STAMP)

$(TRL_STAMP): requirements/trl.txt
	$(PY) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRL_VENV)/bin/python -m pip install -q -r requirements/trl.txt
	$(TRL_VENV)/bin/python -c "import trl; assert trl.__version__ == '1.16.0', trl.__version__"
	touch $(TRL_STAMP)

bench-peers: setup trl-env
	OMP_NUM_THREADS=1 $(VPY) benchmarks/bench_peers.py --out benchmarks/results/$$(date +%F)-peers-cpu.md
	OMP_NUM_THREADS=1 $(VPY) benchmarks/bench_peers.py --cores 2 --out benchmarks/results/$$(date +%F)-peers-2cores-cpu.md

gpu-check:
	bash benchmarks/gpu_check.sh

gpu-check-dry-run: setup
	PY=$(VPY) bash benchmarks/gpu_check.sh --dry-run

clean:
	rm -rf $(VENV) $(SGL_VENV) $(GPU_VENV) $(TRL_VENV) .venv-router build *.egg-info .pytest_cache .ruff_cache
