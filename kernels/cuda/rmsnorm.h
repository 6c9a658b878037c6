// RMSNorm on the GPU, fp32; the same contract as kernels/cpu/rmsnorm.h with device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lomo::cuda {

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t rows,
                     int64_t dim, float eps, cudaStream_t stream);
// Adds the input gradient to dx and overwrites dweight [dim].
void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                      const float* weight, const float* rstd, int64_t rows, int64_t dim,
                      cudaStream_t stream);

}  // namespace lomo::cuda
