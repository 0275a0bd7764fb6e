# Developer entry points. `make setup` builds .venv (CPU torch pinned); `make test` runs the whole suite.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint format bench gpu-check clean

setup: $(STAMP)

$(STAMP): setup.py requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements/cpu.txt -e '.[dev]'
	touch $(STAMP)

# The whole suite; exit code 5 (no tests collected) is a failure, not a pass.
test: setup
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

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
