# The two front-door commands: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: help setup demo test test-fast test-unit test-data test-model test-flows test-ui test-services bench lint clean stack-up stack-down stack-status
help:  ## list the targets
	@grep -E '^[a-z][a-z -]*:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed  ## create .venv and install the project (idempotent)

demo: setup  ## the main job on the embedded digits data: pretrain, batches, gates, registry
	$(BIN)/unlearn demo

# `make test` is what CI (.ci/run) runs: every test, slow ones included (the browser tests
# need Debian's chromium; .ci/run installs it). A skipped test fails the run (--no-skips), and
# so does a run that collects nothing (pytest exit 5). ARGS passes more pytest options.
# WORKERS: pytest-xdist processes (2, the CI machine's cores; 0 runs in this process).
# Each test file stays on one worker (--dist loadfile), so a file's module fixtures are built
# once; two processes keep both cores busy while a test waits on a server or a child process.
PYTEST  := $(BIN)/python -m pytest
WORKERS ?= 2
ARGS    ?=
XDIST   := -n $(WORKERS) --dist loadfile

test: setup  ## the whole suite CI runs: slow, browser and real-server tests included
	$(PYTEST) $(XDIST) --no-skips --durations=30 $(ARGS)

test-fast: setup  ## the quick loop: slow tests excluded (-m "not slow")
	$(PYTEST) $(XDIST) -m "not slow" --durations=15 $(ARGS)

test-unit test-data test-model test-flows test-ui test-services: test-%: setup  ## one tier: tests/<tier>, slow included
	$(PYTEST) tests/$* $(XDIST) --no-skips --durations=15 $(ARGS)

lint: setup  ## ruff and mypy
	$(BIN)/ruff check unlearning tasks flows tests
	$(BIN)/mypy

# The services on loopback (PostgreSQL, an S3 endpoint, `mlflow server`, `prefect server
# start`): `make stack-up`, then `. .stack.env` points every unlearn command at them.
stack-up: setup  ## start the service stack on 127.0.0.1; writes .stack.env (README: Scaling out)
	$(BIN)/python stack/stack.py up

stack-down:  ## stop the service stack; nothing it started keeps running
	$(BIN)/python stack/stack.py down

stack-status:  ## which of the stack's services run
	$(BIN)/python stack/stack.py status

clean:  ## remove local state (registry, ledger, artifacts); keeps .venv
	rm -rf artifacts mlruns/mlflow.db mlruns/artifacts .prefect data/deletions data/dataset data/releases.json
