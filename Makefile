# labkit — the commands the README names. Each one installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: help install system-tools lab test test-fast test-busy notebooks db-up db-down docs site bench compose-up compose-down clean

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

# The only step that needs root, once: Debian packages. The tests drive chromium (the
# site; JupyterLab as `make lab` starts it, running notebook 01 from its menu),
# docker-compose (compose file validation; no Docker engine needed) and pgbouncer
# (notebook 09, tests/test_pgbouncer.py); nft (package nftables) is optional: notebook 08
# drops packets with it in a network namespace it creates as the user (no root), and
# without it uses its fault proxy instead (its namespace tests are then skipped). As root
# the packages are installed here; an ordinary user is told which are missing and the
# command that installs them (a user's PATH lacks /usr/sbin, where Debian puts nft and
# pgbouncer: the check looks there too). Each entry is command:package.
SYSTEM_TOOLS := chromium:chromium docker-compose:docker-compose pgbouncer:pgbouncer
OPTIONAL_TOOLS := nft:nftables
system-tools:
	@missing=""; optional=""; \
	for t in $(SYSTEM_TOOLS); do PATH="$$PATH:/usr/sbin:/sbin" command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	for t in $(OPTIONAL_TOOLS); do PATH="$$PATH:/usr/sbin:/sbin" command -v $${t%%:*} >/dev/null || optional="$$optional $${t#*:}"; done; \
	if [ -n "$$missing$$optional" ] && [ "$$(id -u)" = 0 ]; then \
	  echo "installing$$missing$$optional (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing $$optional >/dev/null; \
	elif [ -n "$$missing$$optional" ]; then \
	  if [ -n "$$optional" ]; then echo "note: nftables is missing: notebook 08 will use its fault proxy instead of kernel partitions and the namespace tests will be skipped; to install: sudo apt-get install nftables" >&2; fi; \
	  if [ -n "$$missing" ]; then echo "missing system packages:$$missing (the site and notebook 01 in JupyterLab, the compose file check, PgBouncer); install them once with: sudo apt-get install$$missing$$optional" >&2; exit 1; fi; \
	fi

# DATABASE_URL (environment or .env) if set, else the local server, started once.
db-up: install
	@$(PY) -c "from labkit.lab import database_url; print('database:', database_url())"
	@DATABASE_URL="$${DATABASE_URL:-$$($(PY) -m labkit.lab db url --reveal)}" $(PY) -m labkit health --timeout 5

# Interleaved rounds (every client once per round, random order) with medians, spread and
# ratio intervals, psycopg 3 beside psycopg2 and asyncpg: about 3.5 minutes on 2 cores.
# BENCH_ARGS=--quick for a tiny run.
bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

compose-up:
	@test -f .env || { cp .env.example .env && chmod 600 .env && echo "created .env from .env.example: set a password"; }
	docker compose up -d --wait

compose-down:
	docker compose down

db-down: install
	$(PY) -m labkit.lab db down

lab: db-up
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ALLOW_ROOT)

# Three workers on two cores: most tests wait on the server, on timeouts or on faults, not
# on the CPU (with three workers the cores are still idle a third of the run). A module's
# tests stay on one worker; each notebook is a unit of its own and has its own database
# or server (tests/conftest.py). Then the site, built from the notebooks just executed.
test: install system-tools
	$(PY) -m pytest -n 3 --dist loadscope --ignore=tests/test_site.py
	$(PY) -m pytest tests/test_site.py

# Execute the notebooks once; executed copies go to build/notebooks/ for the site.
notebooks: install
	$(PY) -m pytest -q -m notebook tests/test_notebooks.py

# The site publishes the executed copies of build/notebooks/ (stderr and stray True/False
# results left out: docs/_hooks/executed_notebooks.py); a strict build fails on broken links.
site: notebooks
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Serves even when a notebook fails its assertions: that one is shown without outputs
# (or as last executed), the failure stays on screen above the server's log.
docs: install
	@$(MAKE) --no-print-directory notebooks || echo "make docs: a notebook failed (see above); serving the rest" >&2
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

test-fast: install
	$(PY) -m pytest -m "not slow and not notebook and not reliability"

# The notebooks again, with one core kept busy by an unrelated CPU-bound process (a
# learner's laptop is busy too); executed copies go to build/notebooks-busy/.
test-busy: install
	LABKIT_BUSY_CORES=1 $(PY) -m pytest -q -rP -m notebook tests/test_notebooks.py

clean:
	rm -rf build site .pytest_cache
