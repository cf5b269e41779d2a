#!/usr/bin/env bash
# Sets up the machine and runs the guided demo (network namespaces as pods, the real sidecar).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m firewall demo "$@"
