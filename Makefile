# The two set-up commands of the README. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck install

$(BIN)/iwm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(BIN)/iwm

demo: $(BIN)/iwm
	$(BIN)/iwm demo

lint: $(BIN)/iwm
	$(BIN)/ruff check src tests benchmarks hubconf.py

typecheck: $(BIN)/iwm
	$(BIN)/mypy

# One torch thread per xdist worker: two workers on two cores, no oversubscription.
test: lint typecheck
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/pytest -n 2 --durations=15 -q
