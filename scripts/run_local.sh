#!/usr/bin/env bash
# The main job, CPU local mode: builds lomo, creates a small LLaMA in Hugging Face layout (first run
# only), fine-tunes it with the fused LOMO update on this repository's own docs as byte-level text,
# prints progress and writes the checkpoint to out/finetune/checkpoint-final.
# Extra arguments go to lomo-finetune (e.g. --steps 500 --checkpointing --dtype bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
exec "${BUILD_DIR:-build}/worker/lomo-finetune" \
  --model out/tiny-llama --out out/finetune \
  --data README.md --data docs/ARCHITECTURE.md --data docs/PERFORMANCE.md \
  --data worker/engine/llama_model.cc --data kernels/cpu/attention.cc "$@"
