#!/usr/bin/env bash
# Fails if a C++ source is not clang-format clean (the repository's .clang-format: Google style,
# 100 columns), naming each offending line; `clang-format -i FILE` fixes a file. About a second.
set -euo pipefail
cd "$(dirname "$0")/.."
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  mapfile -t files < <(git ls-files '*.cc' '*.h' '*.cu' '*.cuh')
else
  mapfile -t files < <(find . -path ./build -prune -o -path './build-*' -prune -o -type f \
    \( -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print | sort)
fi
clang-format --dry-run -Werror "${files[@]}"
echo "check_format: ${#files[@]} files clang-format clean"
