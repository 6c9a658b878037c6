// Reductions, dtype widening and gradient preparation on the GPU: the contracts of
// kernels/cpu/reduce.h and kernels/cpu/gradient.h with device pointers. Every reduction is
// deterministic (kernels/cuda/launch.h): `partials` is the backend's buffer of kReductionBlocks
// doubles, reused call after call in stream order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_types.h"

namespace lomo::cuda {

// out[i] = float(in[i]) for `count` values stored as `dtype`.
void convert_to_f32(float* out, const void* in, DType dtype, int64_t count, cudaStream_t stream);
// out[i] = in[i] rounded to nearest even in `dtype` (a copy for kF32), as kernels/dtype.h rounds.
void convert_from_f32(void* out, DType dtype, const float* in, int64_t count, cudaStream_t stream);

// *result (device) = Σx² in double of `count` values stored as `dtype`.
void sum_squares(double* result, const void* x, DType dtype, int64_t count, double* partials,
                 cudaStream_t stream);

// Rounds each fp32 gradient value to `dtype` and back (nothing for fp32).
void round_gradient_to_dtype(float* gradient, int64_t count, DType dtype, cudaStream_t stream);
// gradient ← gradient·unscale; adds Σgradient² to statistics->sum_squares and, if that sum is not
// finite and statistics->first_non_finite < 0, sets first_non_finite = tensor_index.
void unscale_gradient(float* gradient, int64_t count, float unscale, int64_t tensor_index,
                      GradientStatistics* statistics, double* partials, cudaStream_t stream);
// clip_by_value: g ← clamp(g, −clip_value, clip_value); else g ← g·coefficient.
void clip_gradient(float* gradient, int64_t count, bool clip_by_value, float clip_value,
                   float coefficient, cudaStream_t stream);

}  // namespace lomo::cuda
