# Developer entry points. `make setup` builds .venv (CPU torch pinned); `make test` runs the whole suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup sglang-env test test-fast lint format bench gpu-check clean

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

# The whole suite; exit code 5 (no tests collected) is a failure, not a pass.
test: setup sglang-env
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

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) $(SGL_VENV) build *.egg-info .pytest_cache .ruff_cache
