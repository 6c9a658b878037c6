// Linear-layer biases on the GPU: the contract of kernels/cpu/bias.h with device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lomo::cuda {

// y[r, c] += bias[c] for y [rows, cols].
void bias_forward(float* y, const float* bias, int64_t rows, int64_t cols, cudaStream_t stream);
// dbias[c] = Σ_r dy[r, c]; overwrites dbias [cols]. Deterministic (each column summed in row
// order by one thread, no atomics).
void bias_backward(float* dbias, const float* dy, int64_t rows, int64_t cols, cudaStream_t stream);

}  // namespace lomo::cuda
