# Quick start: `make demo` runs the local demo, `make test` runs the whole suite.
# Both create .venv when missing and install what the project needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench proto lint lint-infra sysdeps clean

# The install compiles store/_speedups.c and engine/_speedups.c: sysdeps first (a C compiler,
# Python's and OpenSSL's headers).
$(STAMP): pyproject.toml setup.py store/_speedups.c engine/_speedups.c
	PYTHON=$(PYTHON) scripts/sysdeps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

sysdeps:
	PYTHON=$(PYTHON) scripts/sysdeps

demo: $(STAMP) sysdeps
	$(BIN)/xdc demo

# Two pytest workers (pytest-xdist): most tests wait on real processes, so two share
# two cores well. --dist loadfile keeps a module's tests, in file order, and its
# module-scoped fixtures on one worker. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP) sysdeps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP) sysdeps
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/xdc bench store --json bench/results/store.json
	$(BIN)/xdc bench replication --json bench/results/replication.json
	$(BIN)/xdc bench engine --json bench/results/engine.json
	$(BIN)/xdc bench tracing --json bench/results/tracing.json

proto: $(STAMP)
	$(BIN)/python -m xdc.protogen

lint: $(STAMP)
	$(BIN)/ruff check .

# checkov on deploy/terraform, in its own virtualenv (.venv-infra).
lint-infra:
	scripts/lint-infra

clean:
	rm -rf $(VENV) .venv-infra .pytest_cache
