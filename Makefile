# The two commands a new user needs (see README): `make bench` and `make test`.
# Each creates .venv and installs what is missing: torch FIRST, then gradkit.
# torch: without an NVIDIA GPU (no nvidia-smi, no /proc/driver/nvidia) the CPU build from
# PyTorch's CPU wheel index -- a bare `pip install torch` would pull the multi-GB CUDA build --
# and, if that index cannot be reached within a few seconds (no retries), the default index;
# with an NVIDIA GPU, the default index's CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradkit-installed
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_TIMEOUT ?= 10

.PHONY: bench test test-slow lint clean torch

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(MAKE) --no-print-directory torch VENV=$(VENV)
	@$(PY) -m pip install -q -e ".[dev]"
	@# test oracle whose metadata requires torchvision (which would replace the CPU torch);
	@# the tests load only its aggregator and attack modules, which need torch and numpy
	@$(PY) -m pip install -q --no-deps "byzfl>=0.0.11"
	@touch $(STAMP)

torch:
	@if $(PY) -c "import torch" 2>/dev/null; then :; \
	elif command -v nvidia-smi >/dev/null 2>&1 || test -e /proc/driver/nvidia; then \
	  echo "NVIDIA GPU found: $(TORCH_SPEC), CUDA build, from the default index"; \
	  $(PY) -m pip install -q "$(TORCH_SPEC)"; \
	else \
	  echo "no NVIDIA GPU: $(TORCH_SPEC), CPU build, from $(TORCH_CPU_INDEX)"; \
	  $(PY) -m pip install -q --timeout $(TORCH_INDEX_TIMEOUT) --retries 0 \
	    --index-url "$(TORCH_CPU_INDEX)" "$(TORCH_SPEC)" || \
	  { echo "$(TORCH_CPU_INDEX) not usable: $(TORCH_SPEC) from the default index instead"; \
	    $(PY) -m pip install -q "$(TORCH_SPEC)"; }; \
	fi

bench: $(STAMP)
	$(VENV)/bin/gradkit bench $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info
