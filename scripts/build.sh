#!/usr/bin/env bash
# Installs system dependencies (scripts/setup.sh), configures and builds lomo into build/.
# Environment: BUILD_DIR (default build), LOMO_WERROR (default ON under CI), JOBS (default nproc),
# LOMO_CMAKE_ARGS (more -D options, e.g. "-DLOMO_PORTABLE=ON" for images: deploy/docker).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
build_dir=${BUILD_DIR:-build}
werror=${LOMO_WERROR:-$([ -n "${CI:-}" ] && echo ON || echo OFF)}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOMO_WERROR="$werror" \
  ${LOMO_CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "${JOBS:-$(nproc)}"
