#!/usr/bin/env bash
# Builds localhost/palisade:dev with podman from a local base (scripts/base-image.sh) and wheels
# built on this host, so no container registry and no PyPI access happen inside the build.
# Incremental: the wheels are cached by a hash of the dependency list, the base by a hash of its
# inputs, and podman's layer cache rebuilds only what changed (a code change: the last layers).
# Prints the build time and the image size.
#
#   scripts/image.sh                 # -> localhost/palisade:dev
#   PALISADE_IMAGE=name:tag scripts/image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${PALISADE_IMAGE:-localhost/palisade:dev}
CACHE=${PALISADE_CACHE:-/var/cache/palisade}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ "$(id -u)" != 0 ]; then echo "image.sh: run as root (podman with runc, see docs/platform.md)" >&2; exit 2; fi
start=$(date +%s)
bash scripts/containers-conf.sh
BASE=$(bash scripts/base-image.sh | tail -1)

# Wheels for every runtime dependency (plus setuptools to build this project offline), built by
# the host's pip for the image's interpreter (both CPython 3.11 on Debian bookworm).
DEPS=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"]))')
WHASH=$(printf '%s\nsetuptools>=77\n' "$DEPS" | sha256sum | cut -c1-12)
WHEELS="$CACHE/wheels-$WHASH"
if [ ! -f "$WHEELS/.done" ]; then
  rm -rf "$WHEELS"; mkdir -p "$WHEELS"
  # shellcheck disable=SC2086
  "$PY" -m pip wheel -q --wheel-dir "$WHEELS" $DEPS 'setuptools>=77'
  touch "$WHEELS/.done"
fi

# A build context with only what the image needs (not .venv, tests or caches).
CTX=$(mktemp -d /var/tmp/palisade-ctx.XXXXXX)
trap 'rm -rf "$CTX"' EXIT
cp -a Dockerfile pyproject.toml setup.py README.md firewall injector dlp_rules "$CTX/"
mkdir "$CTX/wheels" && cp -a "$WHEELS"/*.whl "$CTX/wheels/"
find "$CTX" -name __pycache__ -prune -exec rm -rf {} +
find "$CTX" -name '*.so' -delete  # a relay built for this host's venv: the image builds its own (or none)
podman build --isolation chroot --layers --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" "$CTX" >&2
size=$(podman image inspect -f '{{.Size}}' "$IMAGE")
echo "image.sh: built $IMAGE from $BASE in $(( $(date +%s) - start ))s, size $(numfmt --to=iec "$size")B ($size bytes)" >&2
echo "$IMAGE"
