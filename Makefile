# modeldeploy: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
PYTEST_ARGS ?=
# Where the local cluster keeps its state (kubeconfig, certificates, etcd data, logs).
CLUSTER_DIR ?= $(CURDIR)/.cluster
CLUSTER_NAME ?= modeldeploy
# REAL_NODE=0: only simulated nodes (no containerd, kubelet or images), e.g. a second cluster.
REAL_NODE ?= 1
# The local-cluster tooling lives in tools/localcluster.
LOCALCLUSTER := env PYTHONPATH=$(CURDIR)/tools $(PYTHON) -m localcluster \
	--state-dir '$(CLUSTER_DIR)' --name '$(CLUSTER_NAME)' $(if $(filter 0,$(REAL_NODE)),--no-real-node)

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "; print "Usage: make <target>"} \
	  /^##@/ {printf "\n%s\n", substr($$0, 5)} \
	  /^[a-zA-Z0-9_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

STAGE := $(CURDIR)/tools/stage

##@ Setup
.PHONY: deps
deps: ## Install what demo and test need: Debian packages (containerd, runc, CNI, podman, Prometheus, Go) and pip -e .[dev]
	@tools/install-deps $(PYTHON)

.PHONY: install
install: ## Install modeldeploy with its test and lint tools (pip, editable)
	$(PYTHON) -m pip install --quiet -e '.[dev]'

.PHONY: toolchain
toolchain: ## Build the pinned control-plane and node binaries (cached in ~/.cache/modeldeploy)
	$(LOCALCLUSTER) build

.PHONY: images
images: ## Build the operator, runtime, CPU Triton and pause images with podman (cached by content)
	$(LOCALCLUSTER) images

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
demo: ## The main job: a real inference from a Triton pod on the real node, then a canary
	@started=$$(date +%s) \
	&& $(STAGE) "install dependencies" tools/install-deps $(PYTHON) \
	&& $(STAGE) "control-plane binaries" $(LOCALCLUSTER) build \
	&& $(STAGE) "images" $(LOCALCLUSTER) images >/dev/null \
	&& $(STAGE) "demo" $(LOCALCLUSTER) demo \
	&& echo "==> make demo: done in $$(($$(date +%s) - started))s"

##@ Benchmarks (not tests: ratios against a baseline measured in the same run)
.PHONY: bench
bench: bench-operator bench-runtime bench-rollout bench-autoscale bench-realnode bench-activation bench-fetch ## Every benchmark; results in docs/benchmarks.md

.PHONY: bench-operator
bench-operator: toolchain ## Operator overhead vs bare Deployments, cold start of 1,000 and 10,000, idle reads and writes
	PYTHONPATH=$(CURDIR)/tools:$(CURDIR)/tests $(PYTHON) bench/operator_bench.py $(BENCH_ARGS)

.PHONY: bench-runtime
bench-runtime: ## Sidecar vs direct Triton: throughput ratio, added latency, CPU, RSS, drift cost; shadow copies
	PYTHONPATH=$(CURDIR)/tools:$(CURDIR)/tests $(PYTHON) bench/runtime_bench.py $(BENCH_ARGS)

.PHONY: bench-fetch
bench-fetch: toolchain ## Model fetcher vs curl and crane on the same objects (S3, OCI), cold and warm cache
	PYTHONPATH=$(CURDIR)/tools:$(CURDIR)/tests $(PYTHON) bench/fetch_bench.py $(BENCH_ARGS)

.PHONY: bench-autoscale
bench-autoscale: toolchain ## Builtin autoscaler's reaction to a load step up and down, vs HPA defaults
	PYTHONPATH=$(CURDIR)/tools:$(CURDIR)/tests $(PYTHON) bench/autoscale_bench.py $(BENCH_ARGS)

.PHONY: bench-realnode
bench-realnode: toolchain images ## On real pods: apply to first inference vs a bare Deployment, a whole canary, rollback
	PYTHONPATH=$(CURDIR)/tools:$(CURDIR)/tests $(PYTHON) bench/realnode_bench.py $(BENCH_ARGS)

.PHONY: bench-activation
bench-activation: toolchain images ## On real pods: a wake from zero through the activator vs the pod's own start
	PYTHONPATH=$(CURDIR)/tools:$(CURDIR)/tests $(PYTHON) bench/activation_bench.py $(BENCH_ARGS)

SOAK_SECONDS ?= 1800

.PHONY: bench-rollout
bench-rollout: toolchain ## Fault to 0 % canary traffic at 5 s and 30 s analysis intervals
	PYTHONPATH=$(CURDIR)/tools:$(CURDIR)/tests $(PYTHON) bench/rollout_bench.py $(BENCH_ARGS)

.PHONY: soak
soak: toolchain ## 500 ModelDeployments under random faults (SOAK_SECONDS, default 1800), then invariants
	PYTHONPATH=$(CURDIR)/tools:$(CURDIR)/tests $(PYTHON) bench/soak.py --seconds=$(SOAK_SECONDS) $(SOAK_ARGS)

.PHONY: soak-short
soak-short: toolchain ## The soak's 5-minute form (make test runs it); figures to $TMPDIR/modeldeploy-soak-short.md
	PYTHONPATH=$(CURDIR)/tools:$(CURDIR)/tests $(PYTHON) bench/soak.py --seconds=300 \
	  --output="$${TMPDIR:-/tmp}/modeldeploy-soak-short.md" $(SOAK_ARGS)

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
test-unit: ## Unit and middle-tier tests (fake API, fake clock): no cluster, no binaries
	$(PYTHON) -m pytest -m 'not cluster and not triton and not prometheus and not stores' $(PYTEST_ARGS)

.PHONY: fuzz
fuzz: ## The sidecar's HTTP parser, fuzzed longer than in make test (FUZZ_EXAMPLES=20000)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-20000} $(PYTHON) -m pytest -q tests/unit/test_http1.py -k fuzz $(PYTEST_ARGS)

.PHONY: test-cluster
test-cluster: toolchain ## Tests against the real local control plane (real-pod tier included)
	$(PYTHON) -m pytest -m cluster $(PYTEST_ARGS)

.PHONY: test-realnode
test-realnode: toolchain images ## Only the real-pod tier: our images in real pods on the real node
	$(PYTHON) -m pytest -m realnode $(PYTEST_ARGS)

.PHONY: test
test: ## Everything, on a fresh machine too: dependencies, lint, types, unit, cluster and real-pod tests
	@started=$$(date +%s) \
	&& $(STAGE) "install dependencies" tools/install-deps $(PYTHON) \
	&& $(STAGE) "lint" $(MAKE) --no-print-directory lint \
	&& $(STAGE) "typecheck" $(MAKE) --no-print-directory typecheck \
	&& $(STAGE) "control-plane binaries" $(LOCALCLUSTER) build \
	&& $(STAGE) "images" $(LOCALCLUSTER) images >/dev/null \
	&& $(STAGE) "unit, Triton and Prometheus tests" $(PYTHON) -m pytest -m "not cluster" $(PYTEST_ARGS) \
	&& $(STAGE) "cluster and real-pod tests" $(PYTHON) -m pytest -m cluster $(PYTEST_ARGS) \
	&& $(STAGE) "soak, short form" $(MAKE) --no-print-directory soak-short \
	&& echo "==> make test: done in $$(($$(date +%s) - started))s"

.PHONY: fmt
fmt: ## Format and auto-fix with ruff
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

.PHONY: clean
clean: cluster-down ## Stop the cluster and remove Python caches (keeps the binary cache)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
