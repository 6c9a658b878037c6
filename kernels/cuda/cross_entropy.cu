// Cross-entropy on the GPU, the semantics of kernels/cpu/cross_entropy.cc: one block per row finds
// the row's max and then Σexp(x − max) (two passes, as on the CPU; exps in float, the sum in
// double); one block then sums the per-row losses into the device double in a fixed order (no
// atomics: the same bits on every run); the backward pass is element-wise over rows × vocabulary.
#include <math_constants.h>

#include <algorithm>

#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/kernel_types.h"

namespace lomo::cuda {
namespace {

constexpr int kBlock = 256;  // a multiple of 32: the block reduction works in whole warps
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// Combines `value` over the block in a fixed order (a shuffle tree per warp, then the warps in
// order); every thread gets the result. `shared` holds blockDim.x / 32 values.
template <typename T, typename Combine>
__device__ T block_reduce(T value, T* shared, Combine combine) {
  for (int offset = 16; offset > 0; offset /= 2)
    value = combine(value, __shfl_down_sync(0xffffffffu, value, offset));
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = shared[0];
    for (unsigned warp = 1; warp < blockDim.x / 32; ++warp) total = combine(total, shared[warp]);
    shared[0] = total;
  }
  __syncthreads();
  const T total = shared[0];
  __syncthreads();  // shared is reused by the next reduction
  return total;
}

// Rows stride over the blocks; the row loop is uniform within a block, so its barriers are safe.
__global__ void logsumexp_kernel(float* logsumexp, const float* logits, int64_t rows,
                                 int64_t vocab) {
  __shared__ float shared_max[kBlock / 32];
  __shared__ double shared_sum[kBlock / 32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = logits + r * vocab;
    // fmaxf skips NaN like the CPU's std::fmax; a NaN logit still poisons the sum below.
    float max_logit = -CUDART_INF_F;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) max_logit = fmaxf(max_logit, row[j]);
    max_logit = block_reduce(max_logit, shared_max, Max{});
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(row[j] - max_logit);
    sum = block_reduce(sum, shared_sum, Sum{});
    if (threadIdx.x == 0) logsumexp[r] = max_logit + static_cast<float>(log(sum));
  }
}

// One block: thread t sums rows t, t + blockDim.x, ... then the block combines in a fixed order.
// Runs for rows == 0 too, so that *loss_sum is always written.
__global__ void loss_sum_kernel(double* loss_sum, const float* logsumexp, const float* logits,
                                const int32_t* targets, int64_t rows, int64_t vocab) {
  __shared__ double shared[kBlock / 32];
  double total = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const int32_t target = targets[r];
    if (target == kIgnoreIndex) continue;
    // A device kernel cannot throw: a target outside the vocabulary makes the loss NaN (visible)
    // instead of reading outside the row.
    total += target < 0 || target >= vocab
                 ? CUDART_NAN
                 : static_cast<double>(logsumexp[r]) - logits[r * vocab + target];
  }
  total = block_reduce(total, shared, Sum{});
  if (threadIdx.x == 0) *loss_sum = total;
}

// blockIdx.x picks a chunk of the vocabulary, rows stride over blockIdx.y. Each element is read
// and then written by the same thread, so dlogits may alias logits.
__global__ void cross_entropy_backward_kernel(float* dlogits, const float* logits,
                                              const float* logsumexp, const int32_t* targets,
                                              int64_t rows, int64_t vocab, float scale) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= vocab) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t at = r * vocab + j;
    const int32_t target = targets[r];
    float value = 0.0f;  // ignored rows get no gradient
    if (target != kIgnoreIndex) {
      if (target < 0 || target >= vocab) {
        value = CUDART_NAN_F;  // as in the forward pass: an invalid target shows, never writes out
      } else {
        value = scale * expf(logits[at] - logsumexp[r]);
        if (j == target) value -= scale;
      }
    }
    dlogits[at] = value;
  }
}

}  // namespace

void cross_entropy_forward(double* loss_sum, float* logsumexp, const float* logits,
                           const int32_t* targets, int64_t rows, int64_t vocab,
                           cudaStream_t stream) {
  if (rows > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min(rows, kMaxGridX));
    logsumexp_kernel<<<blocks, kBlock, 0, stream>>>(logsumexp, logits, rows, vocab);
    LOMO_CUDA_CHECK(cudaGetLastError());
  }
  loss_sum_kernel<<<1, kBlock, 0, stream>>>(loss_sum, logsumexp, logits, targets, rows, vocab);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void cross_entropy_backward(float* dlogits, const float* logits, const float* logsumexp,
                            const int32_t* targets, int64_t rows, int64_t vocab, float scale,
                            cudaStream_t stream) {
  if (rows <= 0 || vocab <= 0) return;
  const dim3 grid(static_cast<unsigned>((vocab + kBlock - 1) / kBlock),
                  static_cast<unsigned>(std::min(rows, kMaxGridY)));
  cross_entropy_backward_kernel<<<grid, kBlock, 0, stream>>>(dlogits, logits, logsumexp, targets,
                                                             rows, vocab, scale);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lomo::cuda
