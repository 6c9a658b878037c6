#!/usr/bin/env bash
# lomo against PyTorch + the official LOMO optimizer (PyPI lomo-optim), on the same LLaMA config,
# weights, token batch and thread count, alternating runs; prints tokens/s, peak RSS, their ratios
# and the fraction of this machine's GEMM roofline, for fp32 and bf16 (issue 14, deliverable 4).
#
#   bench/side_by_side.sh [--build-dir DIR] [side_by_side.py flags: --help lists them]
#
# Needs the README's build (DIR/worker/lomo-worker, DIR/bench/engine_bench; default build/ or
# $BUILD_DIR). Python packages: bench/side_by_side-requirements.txt, installed once into a cached
# virtual environment OUTSIDE the clone, $LOMO_BENCH_VENV or
# ~/.cache/lomo/bench-venv-<first 12 hex digits of the requirements file's SHA-256>; a lock
# serialises concurrent installs and an environment is used only once complete. The first run
# downloads ~2.8 GB (torch 2.15.0's wheel 539 MB and the nvidia-* CUDA libraries it links at
# import, ~2.2 GB: PyPI has no CPU-only torch for x86-64 Linux; triton, 286 MB, is left out) and
# installs 4.6 GB, about 1.5 minutes on this machine's link; later runs start at once.
set -euo pipefail

source_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=${BUILD_DIR:-$source_dir/build}
if [[ ${1:-} == --build-dir ]]; then
  build_dir=$2
  shift 2
fi
if [[ ! -d $build_dir ]]; then
  echo "side_by_side.sh: no build directory $build_dir: run the README's build first" \
       "(scripts/build.sh), or name one with --build-dir DIR" >&2
  exit 2
fi
build_dir=$(cd "$build_dir" && pwd)
for program in worker/lomo-worker bench/engine_bench; do
  if [[ ! -x $build_dir/$program ]]; then
    echo "side_by_side.sh: $build_dir/$program is missing: build it first (README:" \
         "scripts/build.sh, or cmake --build $build_dir --target lomo-worker engine_bench)" >&2
    exit 2
  fi
done

requirements=$source_dir/bench/side_by_side-requirements.txt
digest=$(sha256sum "$requirements" | cut -c1-12)
venv=${LOMO_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lomo/bench-venv-$digest}
mkdir -p "$(dirname "$venv")"

# torch without triton (a GPU kernel compiler, ~1 GB installed, never loaded on the CPU): torch
# first with --no-deps, then its declared requirements but triton, then the rest of the file
# (lomo-optim with --no-deps: resolving its requirement on torch would bring triton back).
install_venv() {
  local partial=$venv.partial pip
  rm -rf "$partial"
  python3 -m venv "$partial"
  pip=("$partial/bin/python3" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --no-deps "$(grep -E '^torch==' "$requirements")"
  "$partial/bin/python3" - >"$partial/torch-deps.txt" <<'PY'
import importlib.metadata as metadata
from pip._vendor.packaging.requirements import Requirement
for text in metadata.requires("torch") or []:
    requirement = Requirement(text)
    if requirement.name == "triton" or (requirement.marker and not requirement.marker.evaluate(
            {"extra": ""})):
        continue
    print(str(requirement).split(";")[0])
PY
  "${pip[@]}" -r "$partial/torch-deps.txt" -r <(grep -vE '^(torch|lomo-optim)==' "$requirements")
  "${pip[@]}" --no-deps "$(grep -E '^lomo-optim==' "$requirements")"
  echo "(pip's note that torch requires triton is expected: triton is left out on purpose)"
  touch "$partial/.complete"
  rm -rf "$venv"
  mv "$partial" "$venv"
}

exec 9>"$venv.lock"
flock 9
if [[ ! -f $venv/.complete ]]; then
  echo "installing bench/side_by_side-requirements.txt into $venv (once; ~2.8 GB download)"
  start=$SECONDS
  install_venv
  echo "installed in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1) on disk)"
fi
flock -u 9

exec "$venv/bin/python3" "$source_dir/bench/side_by_side.py" \
  --worker "$build_dir/worker/lomo-worker" --engine-bench "$build_dir/bench/engine_bench" "$@"
