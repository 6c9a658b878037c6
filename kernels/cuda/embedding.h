// Token embeddings on the GPU: the contract of kernels/cpu/embedding.h with device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/dtype.h"

namespace lomo::cuda {

// out[i] = float(table[tokens[i]]), rows of `dim` of a table stored as `dtype`.
void embedding_forward(float* out, const int32_t* tokens, const void* table, DType dtype,
                       int64_t count, int64_t dim, cudaStream_t stream);
// Adds each row of dout into its token's row of dtable, deterministically (no float atomics:
// repeated tokens are summed in row order, as on the CPU).
void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t count,
                        int64_t dim, cudaStream_t stream);

}  // namespace lomo::cuda
