# `make demo` shows a rotation on this machine; `make test` runs the whole check chain (what
# CI runs); `make run` starts Rotor for real.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

$(BIN)/rotor: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: demo run test lint format bench
demo: $(BIN)/rotor
	$(BIN)/rotor demo

run: $(BIN)/rotor
	$(BIN)/rotor serve

lint: $(BIN)/rotor
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

format: $(BIN)/rotor
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(BIN)/rotor
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done
