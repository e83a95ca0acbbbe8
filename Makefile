# The two commands a new user needs (see README): `make bench` and `make test`.
# Each creates .venv and installs what is missing: the CPU build of torch FIRST
# (a bare `pip install torch` would pull a multi-GB CUDA build), then gradkit.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradkit-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: bench test test-slow lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

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
