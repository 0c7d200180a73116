# The README's two commands: `make run` and `make test`. Both bootstrap .venv from scratch.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MLflow's default local store (the plain file store refuses to open in mlflow 3.17).
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export PATH := $(abspath $(BIN)):$(PATH)
export GIT_PYTHON_REFRESH := quiet
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: help install run test test-fast bench repro ui server clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# One line per step; pip's own output (and its download bars on a terminal) shows the long step's progress.
$(BIN)/.installed: requirements.txt pyproject.toml
	@echo "==> [1/3] $(VENV): a virtual environment with $$($(PYTHON) --version 2>&1)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [2/3] the pinned requirements (torch CPU build, mlflow, dvc, ...): a few minutes the first time"
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on -r requirements.txt
	@echo "==> [3/3] graphtune itself (editable: your edits to src/ take effect at once)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@
	@echo "==> ready: $(VENV) ($$($(BIN)/python -c 'import torch, mlflow; print("torch", torch.__version__, "- mlflow", mlflow.__version__)'))"

install: $(BIN)/.installed  ## create .venv and install the pinned requirements and the package

run: install  ## the main job on the embedded sample, tracked in MLflow (mlflow run . with defaults)
	$(BIN)/mlflow run . --env-manager local --experiment-name graphtune $(MLFLOW_ARGS)

test: install  ## the test suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install  ## the test suite without the slow end-to-end tests
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install  ## the benchmarks in bench/ (tables printed, JSON under bench/results/)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

repro: install  ## the DVC pipeline (prepare -> experiment -> compare)
	$(BIN)/dvc repro

ui: install  ## the MLflow UI on http://127.0.0.1:5000
	@echo "runs: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

server: install  ## a shared tracking server (graphtune server; options: SERVER_ARGS="--host 0.0.0.0 ...")
	$(BIN)/graphtune server $(SERVER_ARGS)

clean:  ## remove local state (keeps .venv and the DVC cache)
	rm -rf mlruns mlartifacts outputs .pytest_cache
