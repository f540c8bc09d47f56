#!/usr/bin/env bash
# Shared settings and helpers of the scripts/k8s-*.sh scripts (sourced, not run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART=$ROOT/charts/courier

K8S=${K8S:-kind}                          # kind | minikube
CLUSTER=${CLUSTER:-courier}               # kind cluster name / minikube profile
RELEASE=${RELEASE:-courier}
NAMESPACE=${NAMESPACE:-courier}
IMAGE_TAG=${IMAGE_TAG:-$(awk '/^appVersion:/ {gsub(/"/, "", $2); print $2}' "$CHART/Chart.yaml")}
KUBERAY_VERSION=${KUBERAY_VERSION:-1.7.1}
KSERVE_VERSION=${KSERVE_VERSION:-v0.21.0}
CERT_MANAGER_VERSION=${CERT_MANAGER_VERSION:-v1.19.4}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Fail with a sentence a user can act on when a command is missing.
need() {
  local tool=$1 hint=$2
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed: $hint"
}

need_docker() {
  need docker "install Docker (https://docs.docker.com/get-docker/); kind and the image builds need it"
  docker info >/dev/null 2>&1 || die "docker is installed but no Docker engine answers: start Docker (or Docker Desktop) first"
}

need_cluster_tool() {
  case $K8S in
    kind) need kind "install kind >= 0.24 (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)" ;;
    minikube) need minikube "install minikube (https://minikube.sigs.k8s.io/docs/start/)" ;;
    *) die "K8S must be kind or minikube, got '$K8S'" ;;
  esac
}

# helm and kubectl: from PATH, or extracted into .tools/bin by scripts/tools.sh.
HELM=$("$ROOT/scripts/tools.sh" helm)
KUBECTL=$("$ROOT/scripts/tools.sh" kubectl)
helm() { "$HELM" "$@"; }
kubectl() { "$KUBECTL" "$@"; }

need_context() {
  kubectl config current-context >/dev/null 2>&1 ||
    die "kubectl has no current context: run 'make kind-up' (or 'make minikube-up') first"
}
