#!/usr/bin/env bash
# One command for a GPU host: the CUDA tests, kernels against their twins, the compiled step, CUDA graphs
# and every installed loader engine, with a pass/fail table and benchmarks/results/<device>-<date>.json.
# Needs only torch, triton, timm and numpy (DALI and FFCV rows run when they are installed).
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
exec "$python" -m benchmarks.suite "$@"
