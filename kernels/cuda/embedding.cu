// Token embeddings on the GPU. The forward pass is a gather. The backward pass must add repeated
// tokens' rows into one dtable row without float atomics (their order would change the bits from
// run to run), so each dtable entry has exactly one owning thread, which adds the rows in order.
#include <math_constants.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/stored_dtype.h"

namespace lomo::cuda {
namespace {

constexpr int64_t kMaxGridY = 65535;

// blockIdx.x picks a chunk of columns, rows stride over blockIdx.y: coalesced row copies.
template <DType Dtype>
__global__ void embedding_forward_kernel(float* __restrict__ out,
                                         const int32_t* __restrict__ tokens,
                                         const void* __restrict__ table, int64_t count,
                                         int64_t dim) {
  const int64_t column = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (column >= dim) return;
  for (int64_t i = blockIdx.y; i < count; i += gridDim.y) {
    const int32_t token = tokens[i];
    // The caller validates tokens against the vocabulary (unknown here); a negative one would read
    // before the table, so it yields NaN instead.
    out[i * dim + column] =
        token < 0 ? CUDART_NAN_F
                  : load_stored<Dtype>(table, static_cast<int64_t>(token) * dim + column);
  }
}

// A warp covers 32 adjacent columns (coalesced); the block's kTokenClasses warps split the
// vocabulary by token mod kTokenClasses. Thread (column c, class k) alone writes column c of every
// dtable row whose token ≡ k and adds the rows i = 0, 1, ... in order, as the CPU does: the sums
// are deterministic and kTokenClasses times more threads share the work than one per column.
constexpr int kColumnsPerBlock = 32;
constexpr int kTokenClasses = 16;

__global__ void embedding_backward_kernel(float* __restrict__ dtable,
                                          const float* __restrict__ dout,
                                          const int32_t* __restrict__ tokens, int64_t count,
                                          int64_t dim) {
  const int64_t column = blockIdx.x * static_cast<int64_t>(kColumnsPerBlock) + threadIdx.x;
  const int32_t token_class = static_cast<int32_t>(threadIdx.y);
  if (column >= dim) return;
  for (int64_t i = 0; i < count; ++i) {
    const int32_t token = tokens[i];
    // Negative tokens (invalid) are skipped rather than written before the table.
    if (token < 0 || token % kTokenClasses != token_class) continue;
    dtable[static_cast<int64_t>(token) * dim + column] += dout[i * dim + column];
  }
}

}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const void* table, DType dtype,
                       int64_t count, int64_t dim, cudaStream_t stream) {
  if (count <= 0 || dim <= 0) return;
  const dim3 grid(static_cast<unsigned>((dim + kThreadsPerBlock - 1) / kThreadsPerBlock),
                  static_cast<unsigned>(std::min(count, kMaxGridY)));
  with_stored_dtype(dtype, [&](auto stored) {
    embedding_forward_kernel<decltype(stored)::value>
        <<<grid, kThreadsPerBlock, 0, stream>>>(out, tokens, table, count, dim);
  });
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t count,
                        int64_t dim, cudaStream_t stream) {
  if (count <= 0 || dim <= 0) return;
  const unsigned blocks = static_cast<unsigned>((dim + kColumnsPerBlock - 1) / kColumnsPerBlock);
  embedding_backward_kernel<<<blocks, dim3(kColumnsPerBlock, kTokenClasses), 0, stream>>>(
      dtable, dout, tokens, count, dim);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lomo::cuda
