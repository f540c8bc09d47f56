#!/usr/bin/env bash
# Install the operators the chart needs, at pinned versions:
#   KubeRay operator (always), and with KSERVE=1: cert-manager and KServe in Standard mode.
# shellcheck source=scripts/k8s-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-common.sh"

need_context
say "KubeRay operator $KUBERAY_VERSION into namespace ray-system"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
  --namespace ray-system --create-namespace --wait --timeout 5m

if [[ ${KSERVE:-0} == 1 ]]; then
  say "cert-manager $CERT_MANAGER_VERSION (KServe's webhooks need it)"
  helm upgrade --install cert-manager oci://quay.io/jetstack/charts/cert-manager --version "$CERT_MANAGER_VERSION" \
    --namespace cert-manager --create-namespace --set crds.enabled=true --wait --timeout 5m
  say "KServe $KSERVE_VERSION (Standard mode: plain Deployments, no Knative)"
  helm upgrade --install kserve-crd oci://ghcr.io/kserve/charts/kserve-crd --version "$KSERVE_VERSION" \
    --namespace kserve --create-namespace --wait --timeout 5m
  helm upgrade --install kserve oci://ghcr.io/kserve/charts/kserve --version "$KSERVE_VERSION" \
    --namespace kserve --set kserve.controller.deploymentMode=Standard --wait --timeout 5m
  helm upgrade --install kserve-runtime-configs oci://ghcr.io/kserve/charts/kserve-runtime-configs \
    --version "$KSERVE_VERSION" --namespace kserve --wait --timeout 5m
fi
