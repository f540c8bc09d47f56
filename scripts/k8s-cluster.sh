#!/usr/bin/env bash
# Create or delete the local cluster Courier runs on, and load the images into it.
#
#   scripts/k8s-cluster.sh up|down|load-images      (K8S=kind or K8S=minikube; CLUSTER=name)
#
# kind: one node by default (KIND_WORKERS=2 adds workers to see Ray spread over nodes; the shared
# volume then needs ReadWriteMany storage, see docs/kubernetes.md). kind >= 0.24 enforces
# NetworkPolicies with its default CNI; minikube gets Calico for the same reason.
# shellcheck source=scripts/k8s-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-common.sh"

KIND_WORKERS=${KIND_WORKERS:-0}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-}
MINIKUBE_CPUS=${MINIKUBE_CPUS:-4}
MINIKUBE_MEMORY=${MINIKUBE_MEMORY:-10g}

up() {
  need_docker
  need_cluster_tool
  case $K8S in
    kind)
      if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        say "kind cluster $CLUSTER already exists"
      else
        say "creating kind cluster $CLUSTER (workers: $KIND_WORKERS)"
        {
          echo "kind: Cluster"
          echo "apiVersion: kind.x-k8s.io/v1alpha4"
          echo "nodes:"
          echo "  - role: control-plane"
          for _ in $(seq 1 "$KIND_WORKERS"); do echo "  - role: worker"; done
        } | kind create cluster --name "$CLUSTER" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --config - --wait 120s
      fi
      kubectl config use-context "kind-$CLUSTER" ;;
    minikube)
      say "starting minikube profile $CLUSTER"
      minikube start -p "$CLUSTER" --cpus "$MINIKUBE_CPUS" --memory "$MINIKUBE_MEMORY" --cni calico
      kubectl config use-context "$CLUSTER" ;;
  esac
}

down() {
  need_cluster_tool
  case $K8S in
    kind) kind delete cluster --name "$CLUSTER" ;;
    minikube) minikube delete -p "$CLUSTER" ;;
  esac
}

load_images() {
  need_cluster_tool
  local image
  for image in "courier-serving:$IMAGE_TAG" "courier-jobs:$IMAGE_TAG"; do
    say "loading $image into $K8S cluster $CLUSTER"
    case $K8S in
      kind) kind load docker-image "$image" --name "$CLUSTER" ;;
      minikube) minikube image load "$image" -p "$CLUSTER" ;;
    esac
  done
}

case ${1:-} in
  up) up ;;
  down) down ;;
  load-images) load_images ;;
  *) die "usage: $0 up|down|load-images" ;;
esac
