# dmarw: two commands on a fresh machine.
#   make demo   creates .venv, installs dmarw, runs the main job on a built-in default
#   make test   installs the test dependencies into .venv and runs the whole suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip==23.2.1" "setuptools==84.2.1"

$(STAMP): $(BIN)/python pyproject.toml $(shell find src -name '*.py' -o -name '*.c' 2>/dev/null)
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/dmarw demo

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/paths.py

clean:
	rm -rf $(VENV) build src/*.egg-info
