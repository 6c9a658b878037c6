// Causal grouped-query attention on the GPU: the contract and q/k/v/out layouts of
// kernels/cpu/attention.h with device pointers (first_key null or [batch·seq_len]), but what
// forward saves for backward is each row's log-sum-exp and each query's first key
// (attention_saved_floats), not the probabilities: memory O(B·H·T) saved plus O(H·C·T) scratch.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace lomo::cuda {

// Floats of `saved` attention_forward writes and attention_backward reads.
int64_t attention_saved_floats(const AttentionShape& shape);
// Floats of scratch either pass needs (the caller allocates it; its contents do not matter).
int64_t attention_scratch_floats(const AttentionShape& shape);
// The products run through `handle`, which must be bound to `stream`.
void attention_forward(cublasHandle_t handle, float* out, float* saved, float* scratch,
                       const float* q, const float* k, const float* v, const int32_t* first_key,
                       const AttentionShape& shape, cudaStream_t stream);
// Overwrites dq, dk, dv; leaves saved and the inputs intact. Deterministic.
void attention_backward(cublasHandle_t handle, float* dq, float* dk, float* dv, float* scratch,
                        const float* dout, const float* saved, const float* q, const float* k,
                        const float* v, const AttentionShape& shape, cudaStream_t stream);

}  // namespace lomo::cuda
