# modeldeploy: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
PYTEST_ARGS ?=
# Where the local cluster keeps its state (kubeconfig, certificates, etcd data, logs).
CLUSTER_DIR ?= $(CURDIR)/.cluster
CLUSTER_NAME ?= modeldeploy
# The local-cluster tooling lives in tests/localcluster.
LOCALCLUSTER := PYTHONPATH=$(CURDIR)/tests $(PYTHON) -m localcluster \
	--state-dir '$(CLUSTER_DIR)' --name '$(CLUSTER_NAME)'

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "; print "Usage: make <target>"} \
	  /^##@/ {printf "\n%s\n", substr($$0, 5)} \
	  /^[a-zA-Z0-9_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

##@ Setup
.PHONY: install
install: ## Install modeldeploy with its test and lint tools (pip, editable)
	$(PYTHON) -m pip install --quiet -e '.[dev]'

.PHONY: toolchain
toolchain: ## Build the pinned control-plane binaries (cached in ~/.cache/modeldeploy)
	$(LOCALCLUSTER) build

##@ Local cluster
.PHONY: cluster-up
cluster-up: toolchain ## Start the local cluster; writes .cluster/kubeconfig (CLUSTER_DIR=...)
	$(LOCALCLUSTER) up

.PHONY: cluster-down
cluster-down: ## Stop every process of the local cluster and remove its state
	$(LOCALCLUSTER) down

.PHONY: cluster-status
cluster-status: ## Tell whether the local cluster is running
	$(LOCALCLUSTER) status

.PHONY: demo
demo: toolchain ## The main job: cluster, CRD, operator, examples/minimal.yaml becoming Ready
	$(LOCALCLUSTER) demo

##@ Benchmarks (not tests: ratios against a baseline measured in the same run)
.PHONY: bench
bench: bench-operator bench-runtime bench-rollout bench-autoscale ## Every benchmark; results in docs/benchmarks.md

.PHONY: bench-operator
bench-operator: toolchain ## Operator overhead vs bare Deployments, cold start of 500, idle writes
	PYTHONPATH=$(CURDIR)/tests $(PYTHON) bench/operator_bench.py $(BENCH_ARGS)

.PHONY: bench-runtime
bench-runtime: ## Sidecar vs direct Triton: throughput ratio, added latency, CPU, RSS, drift cost
	PYTHONPATH=$(CURDIR)/tests $(PYTHON) bench/runtime_bench.py $(BENCH_ARGS)

.PHONY: bench-autoscale
bench-autoscale: toolchain ## Builtin autoscaler's reaction to a load step up and down, vs HPA defaults
	PYTHONPATH=$(CURDIR)/tests $(PYTHON) bench/autoscale_bench.py $(BENCH_ARGS)

.PHONY: bench-rollout
bench-rollout: toolchain ## Fault to 0 % canary traffic at 5 s and 30 s analysis intervals
	PYTHONPATH=$(CURDIR)/tests $(PYTHON) bench/rollout_bench.py $(BENCH_ARGS)

##@ Generated files
.PHONY: crds
crds: ## Regenerate crds/ (and the chart's copy and Prometheus Adapter rules) from the Python models
	$(PYTHON) -m modeldeploy_operator.api.crd > crds/serving.modeldeploy.io_modeldeployments.yaml
	mkdir -p charts/modeldeploy/files charts/modeldeploy/crds
	cp crds/*.yaml charts/modeldeploy/crds/
	$(PYTHON) -m modeldeploy_operator.builders.autoscaler > charts/modeldeploy/files/prometheus-adapter-rules.yaml

##@ Checks
.PHONY: lint
lint: ## ruff (lint and format check) and import contracts
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	lint-imports

.PHONY: typecheck
typecheck: ## mypy --strict
	$(PYTHON) -m mypy

.PHONY: test-unit
test-unit: ## Unit tests: pure logic, no cluster
	$(PYTHON) -m pytest -m 'not cluster' $(PYTEST_ARGS)

.PHONY: test-cluster
test-cluster: toolchain ## Tests against the real local control plane
	$(PYTHON) -m pytest -m cluster $(PYTEST_ARGS)

.PHONY: test
test: lint typecheck toolchain ## Everything: lint, types, unit and cluster tests
	$(PYTHON) -m pytest $(PYTEST_ARGS)

.PHONY: fmt
fmt: ## Format and auto-fix with ruff
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

.PHONY: clean
clean: cluster-down ## Stop the cluster and remove Python caches (keeps the binary cache)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
