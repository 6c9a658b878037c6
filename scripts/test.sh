#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds, runs ctest. Extra arguments go to ctest
# (e.g. scripts/test.sh -L unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure --timeout 600 -j 2 "$@"
