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

.PHONY: demo run test test-under-load lint format bench soak
demo: $(BIN)/rotor
	$(BIN)/rotor demo

run: $(BIN)/rotor
	$(BIN)/rotor serve

lint: $(BIN)/rotor
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# The whole suite RUNS times (default 3) while busy loops load the cores (tests/under_load.sh).
test-under-load: $(BIN)/rotor
	PYTEST=$(BIN)/pytest tests/under_load.sh

format: $(BIN)/rotor
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(BIN)/rotor
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

# `make soak MINUTES=20 SEED=1234`: the fault-injection machine for that long (tests/fault_machine.py).
MINUTES ?= 1
soak: $(BIN)/rotor
	$(BIN)/python benchmarks/soak.py --minutes $(MINUTES) $(if $(SEED),--seed $(SEED))
