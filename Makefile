# labkit — the commands the README names. Each one installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: help install browser lab test test-fast notebooks db-up db-down docs site clean

help:
	@echo "make lab    install, start the database, open JupyterLab on notebooks/"
	@echo "make test   install, then the whole suite (unit, integration, notebooks, docs)"
	@echo "make docs   execute the notebooks and serve the site on http://127.0.0.1:8000"

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

# The site's browser check drives Debian's chromium; as root it is installed here.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: sudo apt-get install chromium" >&2; exit 1; fi; }

db-up: install
	@if [ -z "$$DATABASE_URL" ]; then $(PY) -m labkit db up; else echo "using DATABASE_URL"; fi

db-down: install
	$(PY) -m labkit db down

lab: db-up
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ALLOW_ROOT)

test: install browser
	$(PY) -m pytest

# Execute the notebooks once; executed copies go to build/notebooks/ for the site.
notebooks: install
	$(PY) -m pytest -q -m notebook tests/test_notebooks.py

site: notebooks
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs: notebooks
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

test-fast: install
	$(PY) -m pytest -m "not slow and not notebook and not reliability"

clean:
	rm -rf build site .pytest_cache
