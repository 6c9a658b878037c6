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
targets=(backend_kernels_test gpu_model_test gpu_generation_test rmsnorm_cuda_test gpu_bench)
grep -q nccl_communicator_test tests/CMakeLists.txt && targets+=(nccl_communicator_test)
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"

stage="$(mktemp -d)"
mkdir -p "$stage/lib"
# The product's programs too, for the end-to-end check (trainer, worker daemon, coordinator, CLI).
targets+=(lomo-worker lomo-workerd lomo-coordinator lomoctl)
cmake --build "$build" -j"$(nproc)" --target lomo-worker lomo-workerd lomo-coordinator lomoctl
for target in "${targets[@]}"; do
  cp "$(find "$build" -type f -name "$target" -perm -u+x | head -1)" "$stage/"
done
# Shared libraries from Debian's packages (oneDNN, gRPC, protobuf, yaml-cpp, ...). Left to the
# GPU machine: the C library and the C++ runtime (newer there, and compatible), and CUDA's own
# (cudart, cuBLAS, NCCL), which come with its driver and toolkit.
for binary in "$stage"/*; do
  [[ -f "$binary" ]] || continue
  ldd "$binary" | awk '$3 ~ /^\// {print $3}' |
    grep -vE '/(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+)\.so|/ld-linux|libcuda|libcublas|libcudart|libnccl' |
    while read -r library; do
      cp -Ln "$library" "$stage/lib/"
    done
done
tar -cJf "$archive" -C "$stage" .
rm -rf "$stage"
echo "gpu_bundle: $(du -h "$archive" | cut -f1) in $archive (${targets[*]})"
