#!/usr/bin/env bash
# The whole test suite: unit tests, parsers, policy, DLP, injector, and the integration tests
# that build network namespaces and run real servers through the real sidecar (root needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check firewall injector tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
