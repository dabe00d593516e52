# The two front-door commands: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: help setup demo test test-all bench lint clean
help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed  ## create .venv and install the project (idempotent)

demo: setup  ## the main job on the embedded digits data: pretrain, batches, gates, registry
	$(BIN)/unlearn demo

test: setup  ## the test suite CI runs (slow tests excluded)
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-all: setup  ## every test, the slow ones too
	$(BIN)/python -m pytest --durations=15

lint: setup  ## ruff and mypy
	$(BIN)/ruff check unlearning tasks flows tests
	$(BIN)/mypy

clean:  ## remove local state (registry, ledger, artifacts); keeps .venv
	rm -rf artifacts mlruns/mlflow.db mlruns/artifacts .prefect data/deletions data/dataset data/releases.json
