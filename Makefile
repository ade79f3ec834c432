# labkit — the commands the README names. Each one installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: help install lab test test-fast db-up db-down docs site bench clean

help:
	@echo "make lab    install, start the database, open JupyterLab on notebooks/"
	@echo "make test   install, then the whole suite (unit, integration, notebooks, docs)"
	@echo "make docs   execute the notebooks and serve the site on http://127.0.0.1:8000"
	@echo "make bench  benchmarks to build/bench/ (JSON + PNG)"

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

db-up: install
	@if [ -z "$$DATABASE_URL" ]; then $(PY) -m labkit db up; else echo "using DATABASE_URL"; fi

db-down: install
	$(PY) -m labkit db down

lab: db-up
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ALLOW_ROOT)

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not notebook and not reliability"

clean:
	rm -rf build site .pytest_cache
