// AdamW (PyTorch's formulation, fp32 moments) for one tensor after backward.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_types.h"

namespace lomo::cpu {

// m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
// p ← p·keep − step·(m/correction1) / (sqrt(v/correction2) + eps), in fp32, written back into p's
// dtype. exp_avg, exp_avg_sq, gradient: `count` fp32 values. Does nothing when `skip` (may be
// null) records a non-finite gradient.
void adamw_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                  float* exp_avg, float* exp_avg_sq, const AdamWUpdate& update,
                  const WriteBack& write_back, const GradientStatistics* skip);

}  // namespace lomo::cpu
