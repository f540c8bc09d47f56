#!/usr/bin/env bash
# Build the serving and jobs images (tag IMAGE_TAG, default the chart's appVersion) and load them
# into the local cluster (K8S=kind|minikube; LOAD=0 only builds).
# shellcheck source=scripts/k8s-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/k8s-common.sh"

need_docker
ray_version=$(grep -oP '"ray\[serve\]==\K[0-9.]+' "$ROOT/pyproject.toml")
for name in serving jobs; do
  say "building courier-$name:$IMAGE_TAG"
  DOCKER_BUILDKIT=1 docker build -f "$ROOT/images/$name.Dockerfile" -t "courier-$name:$IMAGE_TAG" \
    --build-arg "RAY_VERSION=$ray_version" "$ROOT"
done
if [[ ${LOAD:-1} == 1 ]]; then
  "$ROOT/scripts/k8s-cluster.sh" load-images
fi
