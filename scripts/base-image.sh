#!/usr/bin/env bash
# Makes a Debian bookworm base image offline-from-registries: debootstrap (minbase) from Debian's
# archive, then `podman import`. The image is tagged with a hash of this script (the package list,
# suite and mirror are all in it), so it is rebuilt only when its inputs change; otherwise the
# cached image is reused in well under a second. Prints the image name on stdout (last line).
#
#   scripts/base-image.sh            # -> localhost/palisade-base:<hash>
#   PALISADE_BASE_FORCE=1 scripts/base-image.sh   # rebuild even if cached
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE=bookworm
MIRROR=${PALISADE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Everything every role of the image needs at run time (init: nft; sidecar: python, libpcap for
# capture filters, setcap/getcap for the file capabilities; webhook: python + CA certificates),
# and python3-venv so the image installs the host's wheels into a venv without a network.
PACKAGES=python3,python3-venv,nftables,iproute2,libpcap0.8,libcap2-bin,ca-certificates,tar
NAME=localhost/palisade-base
if [ "$(id -u)" != 0 ]; then echo "base-image.sh: run as root (debootstrap, podman)" >&2; exit 2; fi
HASH=$( { cat "$0"; echo "$MIRROR"; } | sha256sum | cut -c1-12)
IMAGE="$NAME:$HASH"
if [ -z "${PALISADE_BASE_FORCE:-}" ] && podman image exists "$IMAGE"; then
  echo "base-image.sh: cached $IMAGE" >&2
  echo "$IMAGE"
  exit 0
fi
start=$(date +%s)
ROOT=$(mktemp -d /var/tmp/palisade-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
echo "base-image.sh: debootstrap $SUITE ($PACKAGES) into $ROOT" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >&2
# keep the image small: no apt lists, caches, docs or man pages (nothing at run time reads them)
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* \
  "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/var/log/*.log "$ROOT"/tmp/* || true
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" > "$ROOT/etc/apt/sources.list"
tar --numeric-owner --xattrs --xattrs-include='*' -C "$ROOT" -c . \
  | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE" >&2
podman tag "$IMAGE" "$NAME:latest"
echo "base-image.sh: built $IMAGE in $(( $(date +%s) - start ))s, $(podman image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec)B" >&2
echo "$IMAGE"
