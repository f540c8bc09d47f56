#!/usr/bin/env bash
# Install or upgrade the Courier release, wait until it serves, and run `helm test`.
#   HELM_ARGS="--set kserve.enabled=true" scripts/k8s-deploy.sh
#   RAY_RESTART=1 scripts/k8s-deploy.sh     # also rebuild the Ray cluster (upgradeStrategy None)
# shellcheck source=scripts/k8s-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-common.sh"

need_context
kubectl get crd rayservices.ray.io >/dev/null 2>&1 ||
  die "the RayService CRD is missing: run 'make operators' (KubeRay $KUBERAY_VERSION) first"

say "helm upgrade --install $RELEASE (namespace $NAMESPACE, images $IMAGE_TAG)"
# shellcheck disable=SC2086  # HELM_ARGS is a list of flags
helm upgrade --install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --create-namespace \
  --set "images.serving.tag=$IMAGE_TAG" --set "images.jobs.tag=$IMAGE_TAG" ${HELM_ARGS:-} \
  --wait --timeout "${HELM_TIMEOUT:-45m}"

# Helm 4 --wait watches every object (Jobs included) until it is current; the RayService wait
# below makes the serving verdict explicit. First install: features, training, then Ray.
rayservice=$(kubectl -n "$NAMESPACE" get rayservice -l "app.kubernetes.io/instance=$RELEASE" -o name)
[[ -n $rayservice ]] || die "no RayService of release $RELEASE in namespace $NAMESPACE"

# With ray.upgradeStrategy=None (the default: kind and minikube have no room for a second Ray cluster)
# KubeRay ignores changes to the Ray pods; RAY_RESTART=1 deletes the active RayCluster and KubeRay builds
# a new one from the current spec (a restart: requests fail until it serves again).
if [[ ${RAY_RESTART:-0} == 1 ]]; then
  cluster=$(kubectl -n "$NAMESPACE" get "$rayservice" -o jsonpath='{.status.activeServiceStatus.rayClusterName}')
  if [[ -n $cluster ]]; then
    say "RAY_RESTART=1: deleting RayCluster $cluster; KubeRay creates a new one from the RayService spec"
    kubectl -n "$NAMESPACE" delete raycluster "$cluster" --wait
  fi
fi
say "waiting for $rayservice to be ready (first install: feature bootstrap and training come first)"
kubectl -n "$NAMESPACE" wait --for=condition=Ready "$rayservice" --timeout "${READY_TIMEOUT:-30m}"

say "helm test: real inference requests"
helm test "$RELEASE" --namespace "$NAMESPACE" --logs --timeout 10m
