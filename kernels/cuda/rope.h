// Rotary position embeddings on the GPU: the contract of kernels/cpu/rope.h with device pointers
// (positions [rows] and the table in device memory).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/rope_table.h"

namespace lomo::cuda {

// x [rows, num_heads, 2·half_dim] rotated in place by each row's position.
void rope_forward(float* x, const int32_t* positions, const RopeTableView& table, int64_t rows,
                  int64_t num_heads, cudaStream_t stream);
// The inverse rotation applied to the gradient in place.
void rope_backward(float* dx, const int32_t* positions, const RopeTableView& table, int64_t rows,
                   int64_t num_heads, cudaStream_t stream);

}  // namespace lomo::cuda
