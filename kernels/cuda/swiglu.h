// SwiGLU on the GPU: the contract of kernels/cpu/swiglu.h with device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lomo::cuda {

// out = silu(gate) ∘ up.
void swiglu_forward(float* out, const float* gate, const float* up, int64_t count,
                    cudaStream_t stream);
// Overwrites dgate and dup.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t count, cudaStream_t stream);

}  // namespace lomo::cuda
