// Causal grouped-query attention with the probabilities materialised (kernels/cpu/attention.h has
// the layouts), built as kernels/cpu/attention.cc builds it: per-head products as cuBLAS
// strided-batched GEMMs (kernels/cuda/attention_plan.h has their strides) and row kernels for the
// softmax and its backward.
//
// Forward: probs = scale·q·kᵀ over the whole T×T tile, a row kernel masks it (zeros outside
// [first key, i]) and applies the softmax in place, then out = P·v. Backward, one sequence at a
// time so that scratch holds one sequence's tiles: dv = Pᵀ·dout, dP = dout·vᵀ into scratch, a row
// kernel turns it into dS = P∘(dP − rowsum(P∘dP)) (0 outside the range, where P is 0), then
// dq = scale·dS·k and dk = scale·dSᵀ·q. The query heads of a group add into one dk/dv with beta = 1
// after a first product with beta = 0, in order.
//
// Deterministic: cuBLAS with the backend's fixed handle, workspace and stream gives the same bits
// on every run; the row kernels sum with warp shuffles of a fixed shape; there are no atomics.
//
// A faster version would skip the masked upper triangle (the products do twice the needed FLOPs)
// or drop probs for a flash-style kernel, which needs a seam change.
#include <cmath>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_plan.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/matmul.h"

namespace lomo::cuda {
namespace {

constexpr int kWarp = 32;

// Butterfly reductions: every lane ends with the same bits (the combining operations commute).
__device__ float warp_sum(float value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ float warp_max(float value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

struct WarpIndex {
  int64_t first, count;
};

// This thread's warp and the number of warps in the grid, for warp-per-row grid-stride loops (the
// loop condition is uniform over a warp, so the full-mask shuffles inside are safe).
__device__ WarpIndex warp_index() {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  return WarpIndex{thread / kWarp, static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp};
}

// One warp per probs row r = (b·num_heads + h)·T + i, holding scale·q·kᵀ: softmax over the keys
// [start, i] in place, zeros elsewhere; start is the row's first key, raised to i − window + 1 by a
// sliding window (window > 0). Each lane reads and writes only its own columns j ≡ lane
// (mod 32), so no synchronisation is needed between the passes.
__global__ void softmax_rows_kernel(float* probs, const int32_t* first_key, int64_t rows,
                                    int64_t seq_len, int64_t num_heads, int64_t window) {
  const int lane = threadIdx.x % kWarp;
  const WarpIndex w = warp_index();
  for (int64_t r = w.first; r < rows; r += w.count) {
    const int64_t i = r % seq_len, b = r / (num_heads * seq_len);
    int64_t start = first_key == nullptr ? 0 : first_key[b * seq_len + i];
    if (window > 0 && i - window + 1 > start) start = i - window + 1;
    float* row = probs + r * seq_len;
    float max_score = -INFINITY;
    for (int64_t j = lane; j < seq_len; j += kWarp)
      if (j >= start && j <= i) max_score = fmaxf(max_score, row[j]);
    max_score = warp_max(max_score);
    float sum = 0.0f;
    for (int64_t j = lane; j < seq_len; j += kWarp) {
      if (j >= start && j <= i) {
        const float e = expf(row[j] - max_score);
        row[j] = e;
        sum += e;
      }
    }
    const float inverse = 1.0f / warp_sum(sum);
    for (int64_t j = lane; j < seq_len; j += kWarp)
      row[j] = j >= start && j <= i ? row[j] * inverse : 0.0f;
  }
}

// One warp per row r = h·T + i of one sequence: ds holds dP and receives
// dS = P∘(dP − Σ_{j<=i} P·dP) for j <= i, 0 beyond (P is 0 before the first key, so dS is too).
__global__ void softmax_backward_rows_kernel(float* ds, const float* probs, int64_t rows,
                                             int64_t seq_len) {
  const int lane = threadIdx.x % kWarp;
  const WarpIndex w = warp_index();
  for (int64_t r = w.first; r < rows; r += w.count) {
    const int64_t i = r % seq_len;
    const float* p = probs + r * seq_len;
    float* row = ds + r * seq_len;
    float dot = 0.0f;
    for (int64_t j = lane; j <= i; j += kWarp) dot += p[j] * row[j];
    dot = warp_sum(dot);
    for (int64_t j = lane; j < seq_len; j += kWarp) row[j] = j <= i ? p[j] * (row[j] - dot) : 0.0f;
  }
}

unsigned warp_row_blocks(int64_t rows) { return blocks_for(rows * kWarp); }

float scale_of(const AttentionShape& s) { return 1.0f / std::sqrt(static_cast<float>(s.head_dim)); }

bool empty(const AttentionShape& s) {
  return s.batch == 0 || s.seq_len == 0 || s.num_heads == 0 || s.head_dim == 0;
}

}  // namespace

void attention_forward(cublasHandle_t handle, float* out, float* probs, const float* q,
                       const float* k, const float* v, const int32_t* first_key,
                       const AttentionShape& shape, cudaStream_t stream) {
  if (empty(shape)) return;
  const int64_t group = attention_plan::group_of(shape);
  const float scale = scale_of(shape);
  for (int64_t b = 0; b < shape.batch; ++b)
    for (int64_t g = 0; g < group; ++g)
      gemm(handle, attention_plan::scores(probs, q, k, shape, b, g, scale));
  const int64_t rows = shape.batch * shape.num_heads * shape.seq_len;
  softmax_rows_kernel<<<warp_row_blocks(rows), kThreadsPerBlock, 0, stream>>>(
      probs, first_key, rows, shape.seq_len, shape.num_heads, shape.sliding_window);
  LOMO_CUDA_CHECK(cudaGetLastError());
  for (int64_t b = 0; b < shape.batch; ++b)
    for (int64_t g = 0; g < group; ++g)
      gemm(handle, attention_plan::weighted_values(out, probs, v, shape, b, g));
}

// dP, then dS, of one sequence: the backward runs the sequences in turn.
int64_t attention_backward_scratch_floats(const AttentionShape& shape) {
  return shape.num_heads * shape.seq_len * shape.seq_len;
}

void attention_backward(cublasHandle_t handle, float* dq, float* dk, float* dv, float* scratch,
                        const float* dout, const float* probs, const float* q, const float* k,
                        const float* v, const AttentionShape& shape, cudaStream_t stream) {
  if (empty(shape)) return;
  const int64_t group = attention_plan::group_of(shape);
  const float scale = scale_of(shape);
  const int64_t rows = shape.num_heads * shape.seq_len;
  const int64_t tiles = shape.num_heads * shape.seq_len * shape.seq_len;
  // Stream order keeps the next sequence's dP from overwriting scratch the products still read.
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t g = 0; g < group; ++g) {
      gemm(handle, attention_plan::value_grad(dv, probs, dout, shape, b, g));
      gemm(handle, attention_plan::prob_grad(scratch, dout, v, shape, b, g));
    }
    softmax_backward_rows_kernel<<<warp_row_blocks(rows), kThreadsPerBlock, 0, stream>>>(
        scratch, probs + b * tiles, rows, shape.seq_len);
    LOMO_CUDA_CHECK(cudaGetLastError());
    for (int64_t g = 0; g < group; ++g) {
      gemm(handle, attention_plan::query_grad(dq, scratch, k, shape, b, g, scale));
      gemm(handle, attention_plan::key_grad(dk, scratch, q, shape, b, g, scale));
    }
  }
}

}  // namespace lomo::cuda
