#!/usr/bin/env bash
# The main job, CPU local mode: builds lomo, creates a small random LLaMA in Hugging Face layout
# (first run only), then runs the job spec examples/tiny-adalomo.yaml: a full-parameter fine-tune
# with AdaLomo fused into backward on this repository's own text, progress on the terminal,
# checkpoints and metrics.jsonl under out/tiny-adalomo/.
# Arguments go to `lomo-worker train` (e.g. --set training.steps=500 --set optimizer.name=lomo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
worker="${BUILD_DIR:-build}/worker/lomo-worker"
[ -f out/tiny-llama/config.json ] || "$worker" init-model out/tiny-llama --preset tiny
exec "$worker" train examples/tiny-adalomo.yaml "$@"
