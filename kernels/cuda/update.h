// The update rules on the GPU: the contracts of kernels/cpu/{lomo,adalomo,adamw}_update.h with
// device pointers, fp32 arithmetic, written back into the parameter's storage dtype with the same
// rounding as the CPU (bf16 stochastic rounding from the same counter hash, so both backends round
// identically). Each does nothing when `skip` (device memory, may be null) records a non-finite
// gradient: the kernel reads the flag on the device, the host never waits for it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_types.h"

namespace lomo::cuda {

// p ← p·keep − step·g.
void lomo_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                 const SgdUpdate& update, const WriteBack& write_back,
                 const GradientStatistics* skip, cudaStream_t stream);
// AdaLomo for a matrix [rows, cols] (factored moments) or a vector of `rows` (cols = 0, full
// moment). Overwrites gradient. `partials`: the backend's kReductionBlocks doubles
// (kernels/cuda/launch.h) for its deterministic reductions.
void adalomo_update(void* parameter, DType dtype, int64_t rows, int64_t cols, float* gradient,
                    float* exp_avg_sq_row, float* exp_avg_sq_col, float* exp_avg_sq,
                    const AdaLomoUpdate& update, const WriteBack& write_back,
                    const GradientStatistics* skip, double* partials, cudaStream_t stream);
void adamw_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                  float* exp_avg, float* exp_avg_sq, const AdamWUpdate& update,
                  const WriteBack& write_back, const GradientStatistics* skip, cudaStream_t stream);

}  // namespace lomo::cuda
