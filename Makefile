# Developer entry points. `make setup` builds .venv (CPU torch pinned); `make test` runs the whole suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup sglang-env trl-env test test-fast lint format bench bench-peers gpu-check clean

setup: $(STAMP)

$(STAMP): setup.py requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements/cpu.txt -e '.[dev]'
	touch $(STAMP)

# The whole suite; exit code 5 (no tests collected) is a failure, not a pass.
# SGLang server environment, separate from the trainer's .venv (facts: /work/shared/notes/sglang-on-cpu.md).
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

test: setup sglang-env
	$(VPY) -m pytest tests -q -rs --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: setup
	$(VPY) -m pytest tests/unit -q -x

lint: setup
	$(VPY) -m ruff check . && $(VPY) -m ruff format --check .

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

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) $(SGL_VENV) $(TRL_VENV) build *.egg-info .pytest_cache .ruff_cache
