// Sums of squares with a fixed association (parallel_sum.h: reproducible for a given thread
// count, which is what makes a resumed run bit-identical), and the per-pass gradient statistics.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_types.h"

namespace lomo::cpu {

// Σ x[i]² in double.
double sum_squares(const float* x, int64_t count);
// Σ x[i]² in double of a tensor stored as fp32, bf16 or fp16.
double sum_squares(const void* x, DType dtype, int64_t count);

// Adds one tensor's sum of squares to the pass's statistics; when the sum is inf/NaN and no
// earlier tensor's was, records tensor_index as the first non-finite tensor.
void accumulate_gradient_statistics(GradientStatistics* statistics, double tensor_sum_squares,
                                    int64_t tensor_index);

}  // namespace lomo::cpu
