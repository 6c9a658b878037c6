#!/usr/bin/env bash
# clang-tidy with the repository's .clang-tidy on C++ sources. Needs a configured build tree
# (compile_commands.json) in ${BUILD_DIR:-build}: run scripts/build.sh first.
#
#   scripts/check_tidy.sh              the .cc files changed since ${BASE:-HEAD~1} (a changed
#                                      header brings in its .cc), as CI runs it
#   scripts/check_tidy.sh --all        every .cc file
#   scripts/check_tidy.sh FILE...      the files given
#
# Why only changed files in CI: the whole tree takes more than 10 minutes on the 2-core CI machine
# (grpc and protobuf headers dominate), several times the test suite; one file takes 2 to 10 s.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
if [[ ! -f "$build/compile_commands.json" ]]; then
  echo "check_tidy: no $build/compile_commands.json; run scripts/build.sh first" >&2
  exit 2
fi

if [[ "${1:-}" == "--all" ]]; then
  mapfile -t candidates < <(git ls-files '*.cc')
elif [[ $# -gt 0 ]]; then
  candidates=("$@")
else
  base=${BASE:-HEAD~1}
  if ! git rev-parse --verify --quiet "${base}^{commit}" > /dev/null; then
    echo "check_tidy: no $base to compare with (a shallow clone?): nothing checked"
    exit 0
  fi
  mapfile -t changed < <(git diff --name-only --diff-filter=d "$base" -- '*.cc' '*.h')
  candidates=()
  for file in "${changed[@]}"; do
    [[ "$file" == *.h ]] && file="${file%.h}.cc"
    [[ -f "$file" ]] && candidates+=("$file")
  done
fi

# Only files the build compiles (a CUDA-less build has no entry for the CUDA kernels' tests).
mapfile -t compiled < <(python3 -c 'import json, os, sys
for entry in json.load(open(sys.argv[1])):
    print(os.path.relpath(entry["file"]))' "$build/compile_commands.json" | sort -u)
files=()
for file in $(printf '%s\n' "${candidates[@]}" | sort -u); do
  if printf '%s\n' "${compiled[@]}" | grep -qxF "$file"; then files+=("$file"); fi
done
if [[ ${#files[@]} -eq 0 ]]; then
  echo "check_tidy: no compiled C++ file to check"
  exit 0
fi
echo "check_tidy: ${#files[@]} files"
# -Wno-unknown-warning-option: the compile commands carry GCC-only warning flags.
printf '%s\n' "${files[@]}" | xargs -P 2 -n 4 clang-tidy -p "$build" --quiet \
  --extra-arg=-Wno-unknown-warning-option
