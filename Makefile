# ViT-PCM on Kubeflow Pipelines. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

PIPELINE_YAML ?= build/vitpcm_pipeline.yaml
CRON ?= 0 0 3 * * 1
PARAMS ?=
ARGS ?=
K8S_VERSION ?= 1.31.0

.PHONY: help setup system-deps test test-fast lint format run-local docs-pictures compile-pipeline submit schedule images test-images test-containers validate-manifests mlflow-ui bench clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "; printf "Targets:\n"} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv and install the package with dev tools (idempotent)

test: setup system-deps ## Run the whole test suite (slow tests included), as CI does
	$(BIN)/pytest -q

system-deps: ## Install Debian packages the tests use (headless Chromium for the MLflow UI check)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (MLflow UI screenshot test)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: chromium missing and not root: the MLflow UI test will be skipped"; fi

test-fast: setup ## Run the tests not marked slow
	$(BIN)/pytest -q -m "not slow"

lint: setup ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

run-local: setup ## Run the whole DAG locally (kfp.local, synthetic data, local MLflow + S3); ARGS="--help"
	$(BIN)/python -m localrun $(ARGS)

docs-pictures: setup compile-pipeline ## README's pictures from real outputs: MLflow run page of the last run-local (ARGS="--root DIR"), pipeline graph
	$(BIN)/python -m localrun.docs_pictures screenshots $(ARGS)
	$(BIN)/python -m localrun.docs_pictures graph --package $(PIPELINE_YAML)

mlflow-ui: setup ## Browse the runs of run-local in MLflow at http://127.0.0.1:5000 (ARGS="--root DIR --port N")
	$(BIN)/python -m localrun.mlflow_store ui $(ARGS)

compile-pipeline: setup ## Compile the Kubeflow pipeline to build/vitpcm_pipeline.yaml (upload it in the UI)
	$(BIN)/python -m pipeline.compile --out $(PIPELINE_YAML)
	$(BIN)/python -m pipeline.compile --variant single-node --out build/vitpcm_pipeline_single_node.yaml

submit: compile-pipeline ## Upload a pipeline version and start a run (needs KFP_HOST; PARAMS="epochs=5 gpus=2")
	$(BIN)/python -m pipeline.submit --package $(PIPELINE_YAML) $(addprefix --param ,$(PARAMS))

schedule: compile-pipeline ## Create a recurring retraining run (CRON="0 0 3 * * 1": 6 fields, seconds first)
	$(BIN)/python -m pipeline.schedule --package $(PIPELINE_YAML) --cron "$(CRON)" $(addprefix --param ,$(PARAMS))

images: setup ## Build the CPU and GPU images with podman or docker (ARGS=--push: push and pin the pipeline to their digests)
	PYTHON=$(BIN)/python images/build.sh $(ARGS) cpu gpu

test-images: setup ## Build the CPU image with podman on a debootstrapped Debian base and test it in a container (root; 5-15 min)
	images/setup-podman.sh
	images/make-base.sh
	VITPCM_TEST_IMAGES=1 $(BIN)/pytest -q tests/test_images.py

test-containers: setup ## Build both images with podman, check the GPU image's CUDA libraries, run the DAG in them (root; 20-40 min)
	images/setup-podman.sh
	images/make-base.sh
	VITPCM_TEST_IMAGES=1 $(BIN)/pytest -q -s tests/test_containers.py

validate-manifests: setup ## Render manifests/ with kubectl kustomize, validate every object (strict), hadolint the Dockerfiles
	set -o pipefail; kubectl kustomize manifests/ | $(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION) -
	set -o pipefail; kubectl kustomize manifests/secrets/ | $(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION) -
	kubectl kustomize manifests/trainer/ > /dev/null  # a CRD kind: its schema is checked by tests/test_launchers.py
	$(BIN)/hadolint images/cpu/Dockerfile images/gpu/Dockerfile

bench: setup ## Run the benchmarks (~10 min on 2 cores) and write BENCHMARKS.md; ARGS="--only crf" (bench/learning.py: run it alone)
	$(BIN)/python bench/report.py $(ARGS)

clean: ## Remove caches and local run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache runs build dist
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
