// Launch geometry shared by the CUDA kernel families.
#pragma once

#include <cstdint>

namespace lomo::cuda {

constexpr int kThreadsPerBlock = 256;

// Deterministic reductions run a fixed grid of kReductionBlocks blocks (grid-stride loops), each
// writing one double partial into the backend's partials buffer, then one block sums the partials
// in order: the same bits on every run, no floating-point atomics.
constexpr int kReductionBlocks = 1024;

inline unsigned blocks_for(int64_t count, int threads = kThreadsPerBlock) {
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 32 ? 65535 * 32 : blocks));
}

}  // namespace lomo::cuda
