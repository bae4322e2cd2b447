#!/usr/bin/env bash
# The main job: a short SupMAE pretraining on the embedded synthetic dataset. Prints images/s and
# leaves a checkpoint, metrics.jsonl and config.json under runs/demo-<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/supmae pretrain --model supmae_vit_tiny_patch16 --steps 30 --batch-size 32 --warmup-steps 5 \
  --log-every 5 --checkpoint-every 10 --output "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
