// Causal grouped-query attention on the GPU: the contract and layouts of kernels/cpu/attention.h
// with device pointers (probs [batch, num_heads, seq_len, seq_len] kept for backward, zeros outside
// the attended range; first_key null or [batch·seq_len]).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace lomo::cuda {

// The products run through `handle`, which must be bound to `stream`.
void attention_forward(cublasHandle_t handle, float* out, float* probs, const float* q,
                       const float* k, const float* v, const int32_t* first_key,
                       const AttentionShape& shape, cudaStream_t stream);
// Floats of scratch attention_backward needs (the caller allocates it).
int64_t attention_backward_scratch_floats(const AttentionShape& shape);
// Overwrites dq, dk, dv; leaves probs and the inputs intact. Deterministic.
void attention_backward(cublasHandle_t handle, float* dq, float* dk, float* dv, float* scratch,
                        const float* dout, const float* probs, const float* q, const float* k,
                        const float* v, const AttentionShape& shape, cudaStream_t stream);

}  // namespace lomo::cuda
