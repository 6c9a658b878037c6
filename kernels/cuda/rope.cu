// RoPE on the GPU: one thread per (row, head, pair i) rotates (x[i], x[i + half_dim]) of its head
// by the row's position, in Hugging Face's rotate-half layout, exactly as kernels/cpu/rope.cc.
// Grid-stride over rows·num_heads·half_dim with 64-bit indices.
#include <math_constants.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/rope.h"

namespace lomo::cuda {
namespace {

// direction +1 rotates forward, −1 applies the transpose (inverse) rotation.
__global__ void rope_kernel(float* x, const int32_t* positions, RopeTableView table, int64_t rows,
                            int64_t num_heads, float direction) {
  const int64_t half = table.half_dim;
  const int64_t total = rows * num_heads * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += stride) {
    const int64_t i = index % half, row_head = index / half, row = row_head / num_heads;
    float* head = x + row_head * 2 * half;
    const int32_t position = positions[row];
    if (position < 0 || position >= table.max_position) {
      // A device kernel cannot throw: an index outside the table poisons the head visibly rather
      // than reading past the table.
      head[i] = head[i + half] = CUDART_NAN_F;
      continue;
    }
    const float c = table.cos[position * half + i];
    const float sine = direction * table.sin[position * half + i];
    const float first = head[i], second = head[i + half];
    head[i] = first * c - second * sine;
    head[i + half] = second * c + first * sine;
  }
}

void rotate(float* x, const int32_t* positions, const RopeTableView& table, int64_t rows,
            int64_t num_heads, float direction, cudaStream_t stream) {
  const int64_t total = rows * num_heads * table.half_dim;
  if (total <= 0) return;
  rope_kernel<<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(x, positions, table, rows,
                                                                  num_heads, direction);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void rope_forward(float* x, const int32_t* positions, const RopeTableView& table, int64_t rows,
                  int64_t num_heads, cudaStream_t stream) {
  rotate(x, positions, table, rows, num_heads, 1.0f, stream);
}

void rope_backward(float* dx, const int32_t* positions, const RopeTableView& table, int64_t rows,
                   int64_t num_heads, cudaStream_t stream) {
  rotate(dx, positions, table, rows, num_heads, -1.0f, stream);
}

}  // namespace lomo::cuda
