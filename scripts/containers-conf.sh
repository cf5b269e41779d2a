#!/usr/bin/env bash
# Podman settings this project's image builds and runtime tests need on a Debian host (root):
# runc with cgroupfs (crun and the systemd cgroup manager fail on hybrid-cgroup machines) and
# default ulimits below the host's hard limits (podman's defaults can exceed them, and then no
# container starts). Writes /etc/containers/containers.conf only when it differs; idempotent.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then echo "containers-conf.sh: run as root" >&2; exit 2; fi
command -v podman >/dev/null || { echo "containers-conf.sh: podman not installed" >&2; exit 2; }
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=1048576
nofile=$(( nofile < 16384 ? nofile : 16384 )); nproc=$(( nproc < 32768 ? nproc : 32768 ))
want=$(cat <<CONF
# written by palisade scripts/containers-conf.sh
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
)
mkdir -p /etc/containers
if [ "$(cat /etc/containers/containers.conf 2>/dev/null)" != "$want" ]; then
  if [ -s /etc/containers/containers.conf ] && ! grep -q 'palisade scripts/containers-conf.sh' /etc/containers/containers.conf; then
    cp /etc/containers/containers.conf /etc/containers/containers.conf.palisade-orig
  fi
  printf '%s\n' "$want" > /etc/containers/containers.conf
fi
