#!/usr/bin/env bash
# The test suite; needs no GPU (GPU-only tests skip with a reason). The linter, the type checker and the
# import layers (pyproject.toml) run first: each must report nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .
.venv/bin/lint-imports --no-cache | sed -n '/^Contracts:/p;/BROKEN/,$p'  # its result, not its banner
.venv/bin/pyright --warnings
exec .venv/bin/python -m pytest -q "$@"
