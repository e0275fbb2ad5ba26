# Two commands on a fresh machine: `make serve` (the main job, default model) and `make test`.
# Each creates .venv itself. torch==2.13.0 is installed first so that nothing pulls a CUDA build
# (on machines with a local CPU wheel pip takes it from disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup serve generate test test-fast lint protos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tandem serve $(ARGS)

generate: $(STAMP)
	$(VENV)/bin/tandem generate --chat --prompt "What is the capital of France?" $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

protos: $(STAMP)
	$(PY) -m protos.codegen

bench: $(STAMP)
	$(PY) -m bench.offline

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
