# Developer and CI entry points. `make test` is what the README and .ci/run use.
# Tools come from .venv (uv workspace) and node_modules (buf); nothing relies on an activated venv.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

export UV_PYTHON_DOWNLOADS := never

VENV := .venv
PY := $(VENV)/bin/python
BUF := npx --no-install buf
UV := $(or $(shell command -v uv 2>/dev/null),python3 -m uv)
STAMP := $(VENV)/.make-venv.stamp
PROJECTS := pyproject.toml $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
MEMBERS := conveyor-common conveyor-producer conveyor-worker conveyor-results conveyor-dashboard
STUBS := libs/common/src/conveyor/v1
BASELINE := protos/breaking-baseline.binpb
PYTEST_ARGS ?=
UP_ARGS ?=

.PHONY: help venv proto proto-check lint typecheck test up bench check clean

help:
	@echo "targets: venv proto proto-check lint typecheck test up bench check clean"

venv: $(STAMP)

# Re-runs when the pins change or a service package appears. --reinstall-package rebuilds the
# editable workspace members: one synced before its package existed has no .pth and won't import.
SERVICE_PACKAGES := $(wildcard services/*/src/conveyor/*/__init__.py)
$(STAMP): $(PROJECTS) $(SERVICE_PACKAGES) uv.lock package.json package-lock.json deploy/local/install-system-deps.sh
	deploy/local/install-system-deps.sh
	command -v uv >/dev/null || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --all-packages --frozen $(addprefix --reinstall-package ,$(MEMBERS))
	npm ci --no-audit --no-fund
	touch $@

proto: venv
	$(PY) libs/common/scripts/gen_protos.py

proto-check: venv
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) libs/common/scripts/gen_protos.py "$$tmp"; \
	if ! diff -r -x __pycache__ "$$tmp/conveyor/v1" $(STUBS); then \
		echo "stubs are stale: run make proto" >&2; exit 1; \
	fi
	$(BUF) lint
	$(BUF) format -d --exit-code
	if [ -f $(BASELINE) ]; then $(BUF) breaking --against $(BASELINE); fi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy -p conveyor.common -p conveyor.producer -p conveyor.worker -p conveyor.results -p conveyor.dashboard

# Tests start their own Redis and PostgreSQL; CONVEYOR_SLOW=1 adds the slow ones.
test: venv proto-check
	$(VENV)/bin/pytest $(PYTEST_ARGS)

up: venv
	$(PY) -m conveyor.common.devstack $(UP_ARGS)

bench: venv
	$(PY) bench/run.py

check: lint typecheck proto-check test

clean:
	rm -rf .run
