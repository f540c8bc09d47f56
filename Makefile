SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON_BOOTSTRAP ?= python3.11
TORCH_VERSION := 2.13.0
PORT ?= 8000
SCALE ?= 1
export COURIER_REDIS ?= 127.0.0.1:6379
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

##@ Set-up

.PHONY: help
help: ## Show this help (the default goal)
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m [VAR=value]\n"} \
	  /^[a-zA-Z0-9_-]+:.*?## / { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# CPU PyTorch first, so nothing pulls a CUDA build (see README: set-up elsewhere).
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $@

.PHONY: setup
setup: $(STAMP) ## Create .venv and install the pinned dependencies

.PHONY: services
services: ## Make sure Redis is running on 127.0.0.1:6379 (starts it when installed)
	@bash scripts/ensure-redis.sh

##@ Main

.PHONY: demo
demo: setup ## Everything end to end: data, features, train, serve, sample requests, short load
	$(PY) -m serving.demo --port $(PORT)

.PHONY: test
test: setup ## Run the test suite (unit, parity, consistency, Ray Serve integration, chart checks)
	$(PY) -m pytest

##@ Data, features and models

.PHONY: data
data: setup ## Simulate the city into data/offline (SCALE=4 for a bigger one)
	$(PY) -m models.simulator --out data/offline --scale $(SCALE)

.PHONY: features
features: setup ## feast apply, then materialize the online store up to the simulation's end
	$(PY) -m feature_repo.store apply
	$(PY) -m feature_repo.store materialize

DAYS ?= 14
SHUFFLE ?=
# retrain's MODEL defaults to all (the rollout targets' MODEL defaults to eta): only a MODEL given by the user counts
RETRAIN_MODEL = $(if $(filter command line environment,$(origin MODEL)),$(MODEL),all)

.PHONY: train
train: setup ## Train, evaluate, export, gate and register ETA, retrieval, ranker (champion when none yet; PROMOTE=1)
	$(PY) -m models.eta.train $(if $(PROMOTE),--promote)
	$(PY) -m models.retrieval.train $(if $(PROMOTE),--promote)
	$(PY) -m models.ranker.train $(if $(PROMOTE),--promote)

.PHONY: retrain
retrain: setup ## Challenger(s) on the last DAYS (14) incl. the live city's logs, gated vs the champion (MODEL=eta, SHUFFLE=1)
	$(PY) -m models.retrain --model $(RETRAIN_MODEL) --days $(DAYS) $(if $(SHUFFLE),--shuffle-labels)

##@ Serving

.PHONY: serve
serve: setup ## Run the Ray Serve app in the foreground on PORT (Ctrl-C stops it)
	$(PY) -m serving.launch --port $(PORT)

.PHONY: bench-onnx
bench-onnx: setup ## Compare ONNX Runtime session options on the served model (table for docs/benchmarks.md)
	$(PY) -m serving.session_bench

##@ The live city and monitoring

SPEED ?= 1
SCENARIO ?= normal

.PHONY: world
world: setup ## The live city against `make serve` (SPEED=60 compresses the clock, SCENARIO=rain|new-restaurants|taste-shift)
	$(PY) -m city --url http://127.0.0.1:$(PORT) --speed $(SPEED) --scenario $(SCENARIO)

.PHONY: monitor
monitor: setup ## The monitor (joins, online metrics, drift, freshness on :9108) and Prometheus with the alert rules on :9090
	$(PY) -m monitoring.local --time-scale $(SPEED)

.PHONY: drift-drill
drift-drill: setup ## Healthy city, then rain (the ETA error alert must fire), then no pushes (the freshness alert must fire)
	$(PY) -m monitoring.drill

.PHONY: monitor-report
monitor-report: setup ## Plots of what the monitoring saw (from `make monitor`'s Prometheus, or FROM_DRILL=1)
	$(PY) -m monitoring.report $(if $(FROM_DRILL),--from-drill)

##@ Model versions: rollout, shadow, canary, rollback, the experiment
# Against `make serve` (its Ray dashboard on DASHBOARD): changes are in place, no request is lost.

MODEL ?= eta
DASHBOARD ?= http://127.0.0.1:8265
ROLLOUT := $(PY) -m serving.rollout --dashboard $(DASHBOARD) --url http://127.0.0.1:$(PORT)

.PHONY: rollout
rollout: setup ## Serve VERSION of MODEL (alias, registry number or artifact version); CHALLENGER=, SHADOW=, CANARY= shares
	$(ROLLOUT) rollout --model $(MODEL) $(if $(VERSION),--version $(VERSION)) $(if $(CHALLENGER),--challenger $(CHALLENGER)) \
	  $(if $(SHADOW),--shadow $(SHADOW)) $(if $(CANARY),--canary $(CANARY))

.PHONY: promote
promote: setup ## MODEL's challenger becomes the champion (registry alias and served version)
	$(ROLLOUT) promote --model $(MODEL)

.PHONY: rollback
rollback: setup ## MODEL back to what it served before its last change
	$(ROLLOUT) rollback --model $(MODEL)

.PHONY: rollout-status
rollout-status: setup ## Which version, challenger, shadow and canary share each model has
	$(ROLLOUT) status

.PHONY: rollout-drill
rollout-drill: setup ## Under load (open loop + Locust): roll MODEL out to its challenger and back; exit 1 on any failed request
	$(PY) -m loadtest.rollout_drill --model $(MODEL)

.PHONY: experiment
experiment: setup ## The whole loop on a compressed clock: drift, alert, retrain, gate, shadow, canary, promote (reports/experiments)
	$(PY) -m monitoring.experiment

##@ Kubernetes
# The chart, images and local-cluster path (docs/kubernetes.md). K8S=kind|minikube picks the
# local cluster; RELEASE, NAMESPACE, CLUSTER and IMAGE_TAG can be overridden like any variable.

K8S ?= kind
export K8S
export CLUSTER ?= courier
export RELEASE ?= courier
export NAMESPACE ?= courier
CHART_DIR := charts/courier
CRDS_DIR := .tools/crds
KUBERAY_CRD_COMMIT := feeaf72facab4881ba2b179248bb67315634e229
KSERVE_CRD_COMMIT := aaac4e294dae2c7b1aa1886447793f3aa1c30912

.PHONY: tools
tools: ## Put the pinned helm (v4) and kubectl into .tools/bin when they are not on PATH
	@bash scripts/tools.sh all

.PHONY: checkov
checkov: ## Install checkov into its own venv (.tools/checkov); the chart tests run it
	@bash scripts/tools.sh checkov

.PHONY: chart-lint
chart-lint: ## helm lint --strict and helm template of the chart with its defaults
	@helm=$$(bash scripts/tools.sh helm) && $$helm lint --strict $(CHART_DIR) && \
	  $$helm template $(RELEASE) $(CHART_DIR) --namespace $(NAMESPACE) >/dev/null && echo "chart renders"

.PHONY: chart-test
chart-test: setup ## Offline chart checks: lint, every toggle, schemas, CRDs, KubeRay/KServe rules, fit, security scan
	$(PY) -m pytest tests/test_chart.py tests/test_chart_contract.py tests/test_monitoring_chart.py -q

.PHONY: chart-check
chart-check: setup ## KubeRay's validation, KServe's runtime choice and the fit on the minimum clusters (VALUES=my.yaml)
	$(PY) -m charts.checks $(if $(CLUSTER_PROFILE),--cluster $(CLUSTER_PROFILE)) $(foreach f,$(VALUES),-f $(f))

.PHONY: crds
crds: ## Fetch the pinned upstream CRDs into .tools/crds (needs network); then COURIER_CRDS_DIR=.tools/crds
	@mkdir -p $(CRDS_DIR)
	curl -fsSL -o $(CRDS_DIR)/ray.io_rayservices.yaml https://raw.githubusercontent.com/ray-project/kuberay/$(KUBERAY_CRD_COMMIT)/ray-operator/config/crd/bases/ray.io_rayservices.yaml
	curl -fsSL -o $(CRDS_DIR)/ray.io_rayclusters.yaml https://raw.githubusercontent.com/ray-project/kuberay/$(KUBERAY_CRD_COMMIT)/ray-operator/config/crd/bases/ray.io_rayclusters.yaml
	curl -fsSL -o $(CRDS_DIR)/serving.kserve.io_inferenceservices.yaml https://raw.githubusercontent.com/kserve/kserve/$(KSERVE_CRD_COMMIT)/config/crd/full/serving.kserve.io_inferenceservices.yaml
	curl -fsSL -o $(CRDS_DIR)/serving.kserve.io_servingruntimes.yaml https://raw.githubusercontent.com/kserve/kserve/$(KSERVE_CRD_COMMIT)/config/crd/full/serving.kserve.io_servingruntimes.yaml
	@echo "run the chart tests with: COURIER_CRDS_DIR=$(CRDS_DIR) make chart-test"

.PHONY: images
images: ## Build the serving and jobs images and load them into the kind (or K8S=minikube) cluster
	@bash scripts/k8s-images.sh

.PHONY: kind-up
kind-up: ## Create the kind cluster (KIND_WORKERS=2 for a multi-node one)
	@K8S=kind bash scripts/k8s-cluster.sh up

.PHONY: kind-down
kind-down: ## Delete the kind cluster and everything in it
	@K8S=kind bash scripts/k8s-cluster.sh down

.PHONY: minikube-up
minikube-up: ## Start a minikube profile with Calico (NetworkPolicies enforced); then use K8S=minikube
	@K8S=minikube bash scripts/k8s-cluster.sh up

.PHONY: minikube-down
minikube-down: ## Delete the minikube profile
	@K8S=minikube bash scripts/k8s-cluster.sh down

.PHONY: operators
operators: ## Install the KubeRay operator (KSERVE=1 adds cert-manager and KServe), pinned versions
	@bash scripts/k8s-operators.sh

.PHONY: deploy
deploy: ## helm upgrade --install the release, wait until it serves, then helm test (HELM_ARGS=..., RAY_RESTART=1)
	@bash scripts/k8s-deploy.sh

.PHONY: k8s-loadtest
k8s-loadtest: ## Run the SLO gate (or LOADTEST_ARGS="--set loadtest.engine=locust") in the cluster; wait for it
	@bash scripts/k8s-run.sh loadtest

.PHONY: k8s-chaos
k8s-chaos: ## Run the chaos drill in the cluster (it brings its own open-loop load) and wait for its verdict
	@bash scripts/k8s-run.sh chaos

.PHONY: undeploy
undeploy: ## helm uninstall the release (the data volume goes too unless storage.keepOnUninstall)
	@helm=$$(bash scripts/tools.sh helm) && $$helm uninstall $(RELEASE) --namespace $(NAMESPACE)

##@ Load and failure

LOAD_SCENARIO ?= steady
LOAD_URL ?=
LOCUST_USERS ?= 400
LOCUST_SECONDS ?= 90

.PHONY: loadtest
loadtest: setup ## SLO gate: open-loop load at the target rate, then Locust users (LOAD_SCENARIO=step, LOAD_URL=...)
	$(PY) -m loadtest run $(LOAD_SCENARIO) $(if $(LOAD_URL),--url $(LOAD_URL)) \
	  --locust-users $(LOCUST_USERS) --locust-seconds $(LOCUST_SECONDS)

.PHONY: loadtest-ui
loadtest-ui: setup ## Locust's web UI on :8089 against LOAD_URL (default: `make serve` on PORT)
	$(PY) -m locust -f loadtest/locustfile.py --host $(or $(LOAD_URL),http://127.0.0.1:$(PORT))

.PHONY: capacity-plan
capacity-plan: setup ## Cores, replicas and Redis for USERS, RESTAURANTS, PEAK_RPS from the measured costs (MEASURE=1 re-measures)
	$(if $(MEASURE),$(PY) -m loadtest.capacity_plan measure &&) $(PY) -m loadtest.capacity_plan \
	  --users $(or $(USERS),1000000) --restaurants $(or $(RESTAURANTS),20000) --peak-rps $(or $(PEAK_RPS),2000)

.PHONY: overload
overload: setup ## Open-loop /v1/eta at 1x, 2x, 5x the measured capacity: goodput, refusals (table for docs/benchmarks.md)
	$(PY) -m loadtest.overload $(if $(LOAD_URL),--url $(LOAD_URL))

.PHONY: chaos
chaos: setup ## Kill replicas and the proxy, stop the online store, under load; exit 1 on failed requests
	$(PY) -m loadtest chaos

.PHONY: bench
bench: setup ## Same ETA pipeline on Ray Serve (default, tuned), KServe, uvicorn, in-process (reports/bench)
	$(PY) -m loadtest.bench
