#!/usr/bin/env bash
# Build (or reuse) the Kubernetes binaries the k8s tests and scripts/cluster.sh run:
# kube-apiserver and kubectl from tools/k8s/kube (k8s.io/kubernetes pinned there), helm from
# tools/k8s/helm. No kubelet, scheduler or controller-manager: the tests need an API server
# that admits, stores and watches pods, not one that runs them.
#
# The binaries go to $PALISADE_K8S_CACHE/<key>/bin, where <key> hashes the two go.mod/go.sum
# pairs and the Go version: a pin change builds afresh, anything else reuses the cache.
# Prints the bin directory as its last line. Build times are printed (cold vs cached matters
# for CI's time budget).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PALISADE_K8S_CACHE:-/var/cache/palisade-k8s}"
KUBE_MOD="$ROOT/tools/k8s/kube"
HELM_MOD="$ROOT/tools/k8s/helm"

command -v go >/dev/null || { echo "build-k8s: go not found (apt-get install golang-go)" >&2; exit 1; }

key="$(cat "$KUBE_MOD/go.mod" "$KUBE_MOD/go.sum" "$HELM_MOD/go.mod" "$HELM_MOD/go.sum" \
        <(go env GOVERSION) | sha256sum | cut -c1-12)"
kube_version="$(cd "$KUBE_MOD" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
helm_version="$(cd "$HELM_MOD" && go list -m -f '{{.Version}}' helm.sh/helm/v4)"
case "$kube_version" in v1.*) ;; *) echo "build-k8s: cannot read the k8s.io/kubernetes pin" >&2; exit 1;; esac
OUT="$CACHE/$kube_version-$key"
BIN="$OUT/bin"
mkdir -p "$BIN"

# A concurrent run (two helpers, or CI retrying) waits for the first instead of building twice.
exec 9>"$OUT/.lock"
flock 9

build() {  # build NAME MODULE_DIR PACKAGE LDFLAGS
    local name="$1" dir="$2" pkg="$3" ldflags="$4" start
    if [ -x "$BIN/$name" ]; then
        echo "build-k8s: $name cached ($BIN/$name)" >&2
        return
    fi
    start=$(date +%s)
    ( cd "$dir" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false \
        go build -trimpath -ldflags "-s -w $ldflags" -o "$BIN/$name.tmp" "$pkg" )
    mv "$BIN/$name.tmp" "$BIN/$name"
    echo "build-k8s: built $name in $(( $(date +%s) - start ))s" >&2
}

vpkg="k8s.io/component-base/version"
kube_ld="-X $vpkg.gitVersion=$kube_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$(echo "$kube_version" | cut -d. -f2) -X $vpkg.gitTreeState=clean"
# The API server's own version also feeds client-go's compatibility version checks.
kube_ld="$kube_ld -X k8s.io/client-go/pkg/version.gitVersion=$kube_version"

total_start=$(date +%s)
build kube-apiserver "$KUBE_MOD" k8s.io/kubernetes/cmd/kube-apiserver "$kube_ld"
build kubectl "$KUBE_MOD" k8s.io/kubernetes/cmd/kubectl "$kube_ld"
build helm "$HELM_MOD" helm.sh/helm/v4/cmd/helm "-X helm.sh/helm/v4/internal/version.version=$helm_version"
echo "build-k8s: kubernetes $kube_version, helm $helm_version ready in $(( $(date +%s) - total_start ))s" >&2
echo "$BIN"
