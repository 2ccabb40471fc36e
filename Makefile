# Atlas for Envoy. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install Atlas with its test tools

up: $(STAMP) ## run the whole local stack (proxy :8080, admin :8081); Ctrl-C stops it
	$(BIN)/atlas up $(ARGS)

test: $(STAMP) ## run every test (unit, integration, end-to-end through the real Envoy)
	bash scripts/install-chromium.sh
	bash scripts/install-helm.sh
	$(BIN)/python -m pytest $(ARGS)

test-unit: $(STAMP) ## unit tests only (no sockets)
	$(BIN)/python -m pytest tests/unit $(ARGS)

lint: $(STAMP) ## ruff (lint and format) and mypy: each fails the target
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP) ## benchmarks: bare Envoy vs Envoy+Atlas, writes docs/benchmarks.md
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench $(ARGS)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

.PHONY: help install up test test-unit lint bench clean
