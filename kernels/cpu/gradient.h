// Preparing a gradient as it arrives from backward, in place over fp32 values (DESIGN.md's order:
// storage-dtype rounding, [mean across ranks: the communicator], unscale, clip by value, clip
// coefficient).
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_types.h"

namespace lomo::cpu {

// Rounds each value to `dtype` and back, as a GPU computing in fp16/bf16 would hold the gradient:
// an fp16 value beyond ±65504 becomes inf, which is what loss scaling must detect, and tiny ones
// flush to zero, which is what it prevents. A no-op for fp32.
void round_gradient_to_dtype(float* gradient, int64_t count, DType dtype);

// gradient ← gradient·unscale, then adds Σgradient² to `statistics` (reduce.h's
// accumulate_gradient_statistics, naming the tensor `tensor_index` if the sum is not finite).
void unscale_gradient(float* gradient, int64_t count, float unscale, int64_t tensor_index,
                      GradientStatistics* statistics);

// gradient ← clamp(gradient, −clip_value, clip_value)·coefficient when clip_by_value, else
// gradient·coefficient (skipped when the coefficient is 1).
void clip_gradient(float* gradient, int64_t count, bool clip_by_value, float clip_value,
                   float coefficient);

}  // namespace lomo::cpu
