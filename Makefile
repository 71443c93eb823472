# Two entry points (see README): `make run` and `make test`. Each creates its own virtual
# environment in .venv on first use and reuses it afterwards.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROMPT ?= Explain in two sentences what a GPU kernel is.

.PHONY: run test test-gpu tools lint format venv clean

# One pytest session for the unit tests and the notebooks (nbval), so that the closing summary
# lists every skip of the run and the strict mode of tests/conftest.py covers both.
NBVAL       := --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval-sanitize.cfg
# In JOBS pytest-xdist workers (CI has 2 cores; JOBS=0 runs in-process). --dist loadfile keeps a
# file on one worker: a notebook's cells share one kernel, and module fixtures (compiled modules,
# servers) are built once. The workers share WORKBENCH_HOME (tests/conftest.py), so a module one
# worker compiled is a cache hit in the other.
JOBS        ?= 2
XDIST       := -n $(JOBS) --dist loadfile
PYTEST_ARGS ?= tests notebooks

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is needed"'
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed-run

venv: $(VENV)/.installed-dev

## run: set up, pull the default model (SmolLM2-135M-Instruct Q4_1) and generate text with it
run: $(VENV)/.installed-run
	$(BIN)/workbench generate "$(PROMPT)"

## tools: as root, install the system tools that give the tests their extra checks (tests/tools.py)
tools:
	@PYTHON=$(PYTHON) .ci/install-tools

## test: set up and run the whole test suite (lint, format check, pytest incl. the real model,
## the notebooks); WORKBENCH_STRICT=1 turns skips for a missing tool or download into failures
test: tools $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=25 $(XDIST) $(NBVAL) $(PYTEST_ARGS)

## test-gpu: on a machine with a GPU, install the CuPy build for it (ROCm or CUDA, detected) and
## run the gpu-marked tests: every kernel against its reference, greedy tokens equal to NumPy's
test-gpu: $(VENV)/.installed-dev
	@if nvidia-smi -L >/dev/null 2>&1; then extra=cuda; \
	elif [ -e /dev/kfd ] || rocminfo 2>/dev/null | grep -q gfx; then extra=rocm; \
	else echo "test-gpu: no GPU found (nvidia-smi -L lists none; no /dev/kfd, rocminfo lists no gfx agent)"; exit 1; fi; \
	echo "test-gpu: installing the [$$extra] extra (CuPy for $$extra)"; \
	$(BIN)/python -m pip install --quiet -e ".[dev,$$extra]"
	WORKBENCH_REQUIRE_GPU=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m gpu -rs \
		tests/test_device_backend.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
