# The two commands README.md promises a fresh clone: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# what `make run` and `make demo` need (eecp itself, PostgreSQL's driver), and what the tests
# add on top of it; each stamp is remade when pyproject.toml changes
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
ARGS ?=

.PHONY: run demo test lint venv clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[postgres]'
	touch $(RUN_STAMP)

$(TEST_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[postgres,test]'
	touch $(RUN_STAMP) $(TEST_STAMP)

venv: $(TEST_STAMP)

## Set up and run the control plane on the embedded SQLite default (Ctrl-C stops it).
## `make run ARGS=--help` passes options on.
run: $(RUN_STAMP)
	$(BIN)/eecp serve $(ARGS)

## The whole path on loopback: eecp, a dev-PKI agent and a tiny app (see README, "Demo").
## `make demo ARGS="--dir /tmp/demo"` passes options on.
demo: $(RUN_STAMP)
	$(BIN)/eecp demo $(ARGS)

## Set up and run the whole test suite: ruff, mypy (strict on eecp/), the import layers
## (lint-imports, contracts in pyproject.toml), pytest.
test: $(TEST_STAMP)
	$(BIN)/ruff check eecp agent tests
	$(BIN)/mypy eecp agent
	$(BIN)/lint-imports --no-logo
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .grimp_cache
