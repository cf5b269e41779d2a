#!/usr/bin/env bash
# Installs everything Palisade, its tests and its demo need on a fresh Debian machine (as root):
# Debian packages (nftables, iproute2 and the real servers/clients the tests talk to) and a
# virtualenv in .venv with the project installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then echo "install.sh: run as root (it installs Debian packages)" >&2; exit 2; fi
if [ -z "${PALISADE_SKIP_APT:-}" ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev gcc ca-certificates procps util-linux \
    nftables iproute2 tcpdump tshark socat curl openssl iputils-ping \
    nginx libnginx-mod-stream redis-server redis-tools postgresql postgresql-client \
    mariadb-server mariadb-client openssh-server openssh-client dnsmasq bind9-dnsutils \
    nghttp2-client nghttp2-server graphviz chromium iperf3 wrk prometheus \
    podman buildah runc catatonit debootstrap libcap2-bin uidmap etcd-server >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
# podman (image builds, tests/runtime): runc + cgroupfs and ulimits this host accepts
if command -v podman >/dev/null; then bash scripts/containers-conf.sh; fi
# the sidecar drops to UID 1337 and imports lazily: the checkout must be readable by it
chmod -R o+rX . 2>/dev/null || true
# kube-apiserver, kubectl and helm for tests/k8s, built from the pins in tools/k8s into
# /var/cache/palisade-k8s (a few minutes the first time, nothing while the pins are unchanged).
if [ -z "${PALISADE_SKIP_K8S_BUILD:-}" ]; then
  if command -v go >/dev/null; then
    bash scripts/build-k8s.sh >/dev/null
  else
    echo "install.sh: go not found: tests/k8s will skip (scripts/build-k8s.sh needs Go and its module proxy)" >&2
  fi
fi
