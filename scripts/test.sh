#!/usr/bin/env bash
# The test suite; needs no GPU (GPU-only tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
