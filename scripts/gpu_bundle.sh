#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries here (CUDA toolkit present, no GPU needed) and packs
# them with the non-CUDA shared libraries they need into one archive, for a GPU machine that has
# the NVIDIA driver and CUDA libraries but not lomo's build dependencies:
#   scripts/gpu_bundle.sh OUT.tar.xz            then, there:  scripts/gpu_check.sh --bundle OUT.tar.xz
set -euo pipefail
cd "$(dirname "$0")/.."
archive="${1:?usage: scripts/gpu_bundle.sh OUT.tar.xz}"
build=build-gpu
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOMO_CUDA=ON -DLOMO_WERROR=ON >/dev/null
targets=(backend_kernels_test gpu_model_test rmsnorm_cuda_test gpu_bench)
grep -q nccl_communicator_test tests/CMakeLists.txt && targets+=(nccl_communicator_test)
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"

stage="$(mktemp -d)"
mkdir -p "$stage/lib"
for target in "${targets[@]}"; do
  cp "$(find "$build" -type f -name "$target" -perm -u+x | head -1)" "$stage/"
done
# Shared libraries from Debian's packages (OpenBLAS and its Fortran runtime, OpenMP); CUDA's own
# (cudart, cuBLAS, NCCL) are the GPU machine's.
for binary in "$stage"/*; do
  [[ -f "$binary" ]] || continue
  ldd "$binary" | awk '$3 ~ /^\// {print $3}' |
    grep -E 'openblas|gfortran|quadmath|gomp' | while read -r library; do
      cp -L "$library" "$stage/lib/"
    done
done
tar -cJf "$archive" -C "$stage" .
rm -rf "$stage"
echo "gpu_bundle: $(du -h "$archive" | cut -f1) in $archive (${targets[*]})"
