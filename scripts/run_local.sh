#!/usr/bin/env bash
# The main job, in local mode: builds lomo, creates a small random LLaMA in Hugging Face layout
# (first run only), then runs `lomoctl local examples/tiny-adalomo.yaml`: a coordinator and one CPU
# worker start with their state in out/local/, the job (a full-parameter fine-tune with AdaLomo
# fused into backward, on this repository's own text) runs to its end with live progress, its
# final checkpoint is downloaded, SHA-256 verified, into out/local/checkpoints/<job id>/, and both
# processes are stopped. Ctrl-C cancels the job (twice: stops everything at once).
# Arguments go to `lomoctl local` (e.g. --set training.steps=500 --set optimizer.name=lomo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
build="${BUILD_DIR:-build}"
[ -f out/tiny-llama/config.json ] || "$build/worker/lomo-worker" init-model out/tiny-llama --preset tiny
exec "$build/client/lomoctl" local examples/tiny-adalomo.yaml "$@"
