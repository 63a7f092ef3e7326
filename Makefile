# `make demo` and `make test` each set everything up on a fresh machine: a virtual environment,
# torch==2.13.0 first (a CPU build here; any other torch pulls GBs of CUDA wheels), then the package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck browser bench clean

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

# headless Chromium for tests/test_explorer.py: Debian's packages, installed when missing and run as root (as CI does);
# otherwise a hint (the browser tests skip without it, except in CI, where they fail)
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "browser tests need chromium: sudo apt-get install chromium chromium-driver (they skip without it)"; fi

test: lint typecheck browser
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_build.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache .mypy_cache
