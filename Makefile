# ViT-PCM on Kubeflow Pipelines. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help setup test test-fast lint format run-local clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "; printf "Targets:\n"} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv and install the package with dev tools (idempotent)

test: setup ## Run the whole test suite (slow tests included), as CI does
	$(BIN)/pytest -q

test-fast: setup ## Run the tests not marked slow
	$(BIN)/pytest -q -m "not slow"

lint: setup ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

run-local: setup ## Run the whole pipeline locally on synthetic data (not yet available)
	@echo "make run-local: not yet available: the Kubeflow pipeline has not landed."
	@echo "Meanwhile run single steps with: $(BIN)/vitpcm --help"
	@exit 1

clean: ## Remove caches and local run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache runs build dist
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
