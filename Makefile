# The two commands README.md promises a fresh clone: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run demo test lint venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## Set up and run the control plane on the embedded SQLite default (Ctrl-C stops it).
run: $(STAMP)
	$(BIN)/eecp serve

## The whole path on loopback: eecp, a dev-PKI agent and a tiny app (see README, "Demo").
demo: $(STAMP)
	$(BIN)/eecp demo

## Set up and run the whole test suite: ruff, mypy (strict on eecp/), the import layers
## (lint-imports, contracts in pyproject.toml), pytest.
test: $(STAMP)
	$(BIN)/ruff check eecp agent tests
	$(BIN)/mypy eecp agent
	$(BIN)/lint-imports --no-logo
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .grimp_cache
