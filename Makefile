# loraplane: every target documented with a `## ` comment; `make` alone lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Binaries of the local control plane are cached outside the clone so CI and
# later sessions reuse them; the cluster's state (certs, etcd, logs) stays in .cache/.
export LORAPLANE_CACHE ?= $(HOME)/.cache/loraplane
include e2e/cluster/versions.env
HELM := $(LORAPLANE_CACHE)/bin/helm-$(HELM_VERSION)/helm
CHART := charts/loraplane

.PHONY: help install test test-slow test-gpu lint typecheck crds verify demo demo-runtime \
        cluster-bins cluster-up cluster-down kubeconfig kubectl bench-cpu bench-gpu e2e clean \
        up down helm-lint images kind-up kind-deploy kind-down

help: ## List every target
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[operator,router,runtime,dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install loraplane with every extra (pinned)

test: install cluster-bins ## Run the default test suite (unit + real control plane), as CI does
	$(PY) -m pytest

test-slow: install cluster-bins ## Run the slow tests too
	$(PY) -m pytest -m 'not gpu and not clients'

test-gpu: install ## Run the GPU tests (needs CUDA)
	$(PY) -m pytest -m gpu

.PHONY: test-clients
CLIENTS_VENV := .venv-clients
$(CLIENTS_VENV)/.installed: tests/runtime/clients-requirements.txt
	$(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install -q -r tests/runtime/clients-requirements.txt
	touch $@

test-clients: install $(CLIENTS_VENV)/.installed ## Run the TGI/LoRAX client tests in their own pinned venv
	$(PY) -m pytest -m clients tests/runtime

lint: install ## Lint with ruff
	$(VENV)/bin/ruff check src tests bench e2e
	$(VENV)/bin/ruff format --check src tests bench e2e

typecheck: install ## Type-check src/ with mypy
	$(VENV)/bin/mypy

crds: install ## Generate crds/*.yaml and the chart's copy from the pydantic models
	$(PY) -m loraplane.api.crdgen --out crds --chart charts/loraplane/crds

verify: install ## Fail when generated files (CRDs, chart copy) drift from the models; lint the chart
	$(PY) -m loraplane.api.crdgen --out crds --chart charts/loraplane/crds --check
	@if [[ -x "$(HELM)" ]]; then $(MAKE) -s helm-lint; \
	else echo "verify: helm is not built, so the chart was not linted (make cluster-bins)"; fi

helm-lint: ## Lint the chart strictly: defaults, namespaced standalone, and the local values
	$(HELM) lint --strict --quiet --kube-version $(K8S_VERSION) $(CHART)
	$(HELM) lint --strict --quiet --kube-version $(K8S_VERSION) $(CHART) --set 'watchNamespaces={team-a}' --set leaderElection.enabled=false
	$(HELM) lint --strict --quiet --kube-version $(K8S_VERSION) $(CHART) --values e2e/cluster/values-local.yaml

demo: install cluster-bins ## Run the main job: cluster, operator by helm, a model + 3 adapters applied, answers, scaling
	$(PY) -m e2e.demo

demo-runtime: install ## The runtime alone: an embedded tiny model with hot-loaded adapters, no cluster
	$(PY) -m loraplane.demo

cluster-bins: ## Build (cached) kube-apiserver, etcd, controller-manager, scheduler, kubectl, helm, kwok
	e2e/cluster/build.sh

cluster-up: install cluster-bins ## Start the local control plane on 127.0.0.1 (idempotent)
	e2e/cluster/cluster.sh up

cluster-down: ## Stop the local control plane, leaving no processes
	e2e/cluster/cluster.sh down

up: install cluster-bins ## Local control plane + the operator installed by the chart, Ready (idempotent)
	e2e/cluster/cluster.sh up
	e2e/cluster/cluster.sh operator-up

down: ## Uninstall the operator and stop the local control plane, leaving no process
	e2e/cluster/cluster.sh operator-down
	e2e/cluster/cluster.sh down

kubeconfig: ## Print the absolute path of the local cluster's admin kubeconfig
	@e2e/cluster/cluster.sh kubeconfig

kubectl: ## Print the absolute path of the built kubectl
	@e2e/cluster/cluster.sh kubectl

bench-cpu: install ## Run the benchmarks at a tiny size on the CPU (proves the scripts)
	bench/run_all.sh --cpu

bench-gpu: install ## Build, check and time everything on a GPU in one run
	bench/run_all.sh --gpu

image-stack: install ## The runtime tests and sm_90 kernel compiles on the GPU bench image's torch/triton/transformers (CPU)
	bench/image_stack.sh

e2e: install cluster-bins ## End-to-end suite against the local control plane or KUBECONFIG
	$(PY) -m pytest -m e2e e2e

clean: ## Remove the venv and local caches in the clone
	rm -rf $(VENV) .venv-image-stack .cache .pytest_cache .mypy_cache .ruff_cache

# Images: tagged with the chart's appVersion, which is what the chart's default image tags
# follow; override IMAGE_REPO (and IMAGE_TAG) to push to your own registry.
APP_VERSION := $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$$/\1/p' $(CHART)/Chart.yaml)
IMAGE_REPO ?= ghcr.io/loraplane
IMAGE_TAG ?= $(APP_VERSION)
DOCKER ?= docker
export IMAGE_REPO IMAGE_TAG DOCKER

images: ## Build the operator (slim, no torch) and runtime (CUDA) images; needs Docker with BuildKit
	$(DOCKER) build -f images/operator.Dockerfile -t $(IMAGE_REPO)/operator:$(IMAGE_TAG) .
	$(DOCKER) build -f images/runtime.Dockerfile -t $(IMAGE_REPO)/runtime:$(IMAGE_TAG) .

kind-up: ## Create a kind cluster (needs Docker and kind); docs/kind.md
	e2e/kind/kind.sh up

kind-deploy: images ## Build and load the images, install the chart, serve the tiny model on kind
	e2e/kind/kind.sh deploy

kind-down: ## Delete the kind cluster
	e2e/kind/kind.sh down
