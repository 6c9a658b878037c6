#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/rmsnorm.h"

namespace lomo::cuda {
namespace {

constexpr int kBlock = 256;

// One block per row, up to the grid's x limit; the kernels stride over any further rows.
unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(rows < 2147483647 ? rows : 2147483647);
}

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

// One block per row; rows stride over the blocks so that any row count launches (the loop is
// uniform within a block, so block_sum's barriers are safe).
__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* x, const float* weight,
                                       int64_t rows, int64_t dim, float eps) {
  __shared__ float shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * dim;
    float* yr = out + r * dim;
    float sum_squares = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum_squares += xr[i] * xr[i];
    const float scale = rsqrtf(block_sum(sum_squares, shared) / static_cast<float>(dim) + eps);
    if (threadIdx.x == 0) rstd[r] = scale;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = weight[i] * (xr[i] * scale);
  }
}

__global__ void rmsnorm_backward_input_kernel(float* dx, const float* dout, const float* x,
                                              const float* weight, const float* rstd, int64_t rows,
                                              int64_t dim) {
  __shared__ float shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * dim;
    const float* dyr = dout + r * dim;
    float* dxr = dx + r * dim;
    const float s = rstd[r];
    float dot = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dot += dyr[i] * weight[i] * xr[i];
    const float coefficient = block_sum(dot, shared) * s * s / static_cast<float>(dim);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
      dxr[i] += s * (dyr[i] * weight[i] - xr[i] * coefficient);
    }
  }
}

// A block covers 32 adjacent columns (one warp, coalesced) with kRowSlices warps: slice s sums rows
// s, s + kRowSlices, ... of its column, then slice 0 adds the slices in order. Deterministic, no
// atomics, and kRowSlices times the threads of one per column (dim 4096 alone gave 16 blocks).
constexpr int kColumnsPerBlock = 32;
constexpr int kRowSlices = 16;

__global__ void rmsnorm_backward_weight_kernel(float* dweight, const float* dout, const float* x,
                                               const float* rstd, int64_t rows, int64_t dim) {
  __shared__ float partial[kRowSlices][kColumnsPerBlock];
  const int64_t column = blockIdx.x * static_cast<int64_t>(kColumnsPerBlock) + threadIdx.x;
  float total = 0.0f;
  if (column < dim) {
    for (int64_t r = threadIdx.y; r < rows; r += kRowSlices)
      total += dout[r * dim + column] * x[r * dim + column] * rstd[r];
  }
  partial[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y != 0 || column >= dim) return;
  float sum = 0.0f;
  for (int slice = 0; slice < kRowSlices; ++slice) sum += partial[slice][threadIdx.x];
  dweight[column] = sum;
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t rows,
                     int64_t dim, float eps, cudaStream_t stream) {
  if (rows <= 0) return;
  rmsnorm_forward_kernel<<<row_blocks(rows), kBlock, 0, stream>>>(out, rstd, x, weight, rows, dim,
                                                                  eps);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                      const float* weight, const float* rstd, int64_t rows, int64_t dim,
                      cudaStream_t stream) {
  if (rows > 0) {
    rmsnorm_backward_input_kernel<<<row_blocks(rows), kBlock, 0, stream>>>(dx, dout, x, weight,
                                                                           rstd, rows, dim);
    LOMO_CUDA_CHECK(cudaGetLastError());
  }
  // dweight is overwritten even when there are no rows (with zeros, as on the CPU).
  if (dim <= 0) return;
  const unsigned blocks = static_cast<unsigned>((dim + kColumnsPerBlock - 1) / kColumnsPerBlock);
  rmsnorm_backward_weight_kernel<<<blocks, dim3(kColumnsPerBlock, kRowSlices), 0, stream>>>(
      dweight, dout, x, rstd, rows, dim);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lomo::cuda
