# Quick start: `make demo` (the main experiment end to end), `make test` (the test suite).
# Both create the virtualenv .venv and install nmt-tie into it on first use.

PYTHON ?= python3
# torch==2.13.0 is the release nmt-tie is tested with (a CPU build where pip finds one
# locally, a CUDA build from PyPI elsewhere); pyproject.toml itself accepts torch>=2.4.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check nmt_tie tests recipes data
	$(BIN)/ruff format --check nmt_tie tests recipes data

test: lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python recipes/multi30k/run.py --demo --runs runs/demo

clean:
	rm -rf $(VENV) runs
