# `make demo` and `make test` each set everything up on a fresh machine: a virtual environment,
# torch==2.13.0 first (a CPU build here; any other torch pulls GBs of CUDA wheels), then the package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/demo.py

lint: $(STAMP)
	$(BIN)/ruff check tracin_index tests pipelines benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy tracin_index benchmarks pipelines

test: lint typecheck
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_build.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache .mypy_cache
