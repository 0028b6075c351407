# `make demo` shows a rotation on this machine; `make test` runs the whole check chain (what
# CI runs); `make run` starts Rotor for real.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

# constraints.txt pins every dependency; the Dockerfile installs with the same file.
$(BIN)/rotor: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

.PHONY: demo run test test-under-load lint format bench soak constraints
demo: $(BIN)/rotor
	$(BIN)/rotor demo

# Re-pin after changing pyproject.toml's dependencies: a fresh venv, then pip freeze.
constraints:
	rm -rf .venv-pin && $(PYTHON) -m venv .venv-pin
	.venv-pin/bin/pip install --quiet -e '.[dev]'
	{ head -2 constraints.txt; .venv-pin/bin/pip freeze --exclude-editable | grep -v '^rotor=='; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-pin

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

# `make soak MINUTES=20 SEED=1234 [STATE=postgres]`: the fault-injection machine for that long
# (tests/fault_machine.py), the state in SQLite or PostgreSQL.
MINUTES ?= 1
soak: $(BIN)/rotor
	$(BIN)/python benchmarks/soak.py --minutes $(MINUTES) $(if $(SEED),--seed $(SEED)) $(if $(STATE),--state $(STATE))
