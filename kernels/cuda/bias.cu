// Linear-layer biases on the GPU. Forward: one thread per element over a grid-stride loop.
// Backward: one thread per column summing its rows in order, so the result has the same bits on
// every run; neighbouring threads read neighbouring columns, so each row's reads coalesce. A bias
// has at most a few thousand columns per projection, so this is a small share of a layer's time;
// a tiled two-pass reduction would be faster for very few columns.
#include "kernels/cuda/bias.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"

namespace lomo::cuda {
namespace {

__global__ void bias_forward_kernel(float* __restrict__ y, const float* __restrict__ bias,
                                    int64_t count, int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += stride) {
    y[i] += bias[i % cols];
  }
}

__global__ void bias_backward_kernel(float* __restrict__ dbias, const float* __restrict__ dy,
                                     int64_t rows, int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < cols;
       c += stride) {
    float sum = 0.0f;
    for (int64_t r = 0; r < rows; ++r) sum += dy[r * cols + c];
    dbias[c] = sum;
  }
}

}  // namespace

void bias_forward(float* y, const float* bias, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t count = rows * cols;
  if (count <= 0) return;
  bias_forward_kernel<<<blocks_for(count), kThreadsPerBlock, 0, stream>>>(y, bias, count, cols);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void bias_backward(float* dbias, const float* dy, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (cols <= 0) return;
  bias_backward_kernel<<<blocks_for(cols), kThreadsPerBlock, 0, stream>>>(dbias, dy, rows, cols);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lomo::cuda
