#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rmsnorm.h"

namespace lomo::cuda {
namespace {

constexpr int kBlock = 256;

__device__ float block_sum(float value, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0f;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2)
      value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  if (threadIdx.x == 0) shared[0] = value;
  __syncthreads();
  const float total = shared[0];
  __syncthreads();  // shared is reused by the next call
  return total;
}

// One block per row.
__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* x, const float* weight,
                                       int64_t dim, float eps) {
  __shared__ float shared[32];
  const float* xr = x + blockIdx.x * dim;
  float* yr = out + blockIdx.x * dim;
  float sum_squares = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum_squares += xr[i] * xr[i];
  const float scale = rsqrtf(block_sum(sum_squares, shared) / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = scale;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = weight[i] * (xr[i] * scale);
}

__global__ void rmsnorm_backward_input_kernel(float* dx, const float* dout, const float* x,
                                              const float* weight, const float* rstd, int64_t dim) {
  __shared__ float shared[32];
  const float* xr = x + blockIdx.x * dim;
  const float* dyr = dout + blockIdx.x * dim;
  float* dxr = dx + blockIdx.x * dim;
  const float s = rstd[blockIdx.x];
  float dot = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dot += dyr[i] * weight[i] * xr[i];
  const float coefficient = block_sum(dot, shared) * s * s / static_cast<float>(dim);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    dxr[i] += s * (dyr[i] * weight[i] - xr[i] * coefficient);
  }
}

// One thread per column, summing over rows in order: deterministic, no atomics.
__global__ void rmsnorm_backward_weight_kernel(float* dweight, const float* dout, const float* x,
                                               const float* rstd, int64_t rows, int64_t dim) {
  const int64_t column = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (column >= dim) return;
  float total = 0.0f;
  for (int64_t r = 0; r < rows; ++r)
    total += dout[r * dim + column] * x[r * dim + column] * rstd[r];
  dweight[column] = total;
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t rows,
                     int64_t dim, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  rmsnorm_forward_kernel<<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(out, rstd, x, weight,
                                                                             dim, eps);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                      const float* weight, const float* rstd, int64_t rows, int64_t dim,
                      cudaStream_t stream) {
  if (rows == 0) return;
  rmsnorm_backward_input_kernel<<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(
      dx, dout, x, weight, rstd, dim);
  LOMO_CUDA_CHECK(cudaGetLastError());
  const unsigned blocks = static_cast<unsigned>((dim + kBlock - 1) / kBlock);
  rmsnorm_backward_weight_kernel<<<blocks, kBlock, 0, stream>>>(dweight, dout, x, rstd, rows, dim);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lomo::cuda
