# The two set-up commands of the README. Both create .venv and install what they need:
# the demo only the runtime dependencies, the tests the dev extra on top.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck install

# --no-compile: byte-compiling every installed module (torch's thousands) took about a
# third of the demo's install time on 2 cores; Python compiles the few it imports on the
# first run instead.
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --no-compile -e .
	touch $@

$(DEV): $(RUNTIME)
	$(BIN)/pip install --no-compile -e '.[dev]'
	touch $@

install: $(DEV)

demo: $(RUNTIME)
	$(BIN)/iwm demo

lint: $(DEV)
	$(BIN)/ruff check src tests benchmarks hubconf.py

typecheck: $(DEV)
	$(BIN)/mypy

# One torch thread per xdist worker: two workers on two cores, no oversubscription.
test: lint typecheck
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/pytest -n 2 --durations=15 -q
