// Causal grouped-query attention that never holds the T×T matrix: queries run in chunks of C rows
// (kernels/cuda/attention_plan.h has the chunks, the products' strides and their order), each
// chunk's products are cuBLAS strided-batched GEMMs over the keys it can see, and warp-per-row
// kernels mask, softmax and differentiate the chunk's rows.
//
// Forward, per sequence and chunk: S = scale·q_c·kᵀ into scratch [H, C, keys], a row kernel masks
// it (packing, sliding window, causality), applies the softmax in place and saves the row's
// log-sum-exp, then out_c = P·v. Backward, per sequence and chunk: recompute S, a row kernel turns
// it into P = exp(S − lse) (0 outside the attended keys); dv += Pᵀ·dout_c; dP = dout_c·vᵀ into a
// second region; a row kernel makes dS = P∘(dP − Σ_j P·dP) (a chunk holds whole rows, so the sum
// is exact); dq_c = scale·dS·k; dk += scale·dSᵀ·q_c.
//
// Why chunks of cuBLAS products rather than a fused flash kernel: the products stay on cuBLAS's
// tuned (tensor-core with TF32) kernels and the row kernels are the GPU-verified ones in a new
// frame, and the whole plan is host code that a machine without a GPU executes with a reference
// GEMM (tests/unit/attention_plan_test.cc). The cost is one extra S product in backward and
// scratch of two chunk regions (attention_plan::chunk_rows bounds them at 64 MiB).
//
// Deterministic: cuBLAS with the backend's fixed handle, workspace and stream gives the same bits
// on every run; the row kernels sum with warp shuffles of a fixed shape; dk and dv are zeroed,
// then accumulated with beta = 1 in the plan's fixed order; there are no atomics.
#include <cmath>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_plan.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/matmul.h"

namespace lomo::cuda {
namespace {

using attention_plan::Chunk;

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

// A chunk row r = h·queries + (i − query_begin) and the columns [lo, hi] of its attended keys
// (column jj is key key_begin + jj).
struct ChunkRow {
  int64_t head, query, lo, hi;
};

__device__ ChunkRow chunk_row(int64_t r, const Chunk& c, int64_t sample_first_key, int64_t window) {
  const int64_t i = c.query_begin + r % c.queries;
  const int64_t start = attention_plan::first_attended_key(i, sample_first_key, window);
  return ChunkRow{r / c.queries, i, start - c.key_begin, i - c.key_begin};
}

// One warp per row of the chunk's scores: softmax over the attended keys in place, zeros
// elsewhere; lse [batch, heads, T] receives max + log(sum), saved_first [batch·T] (head 0's rows)
// the query's first key. Each lane reads and writes only its own columns jj ≡ lane (mod 32), so no
// synchronisation is needed between the passes.
__global__ void softmax_rows_kernel(float* scores, float* lse, int32_t* saved_first,
                                    const int32_t* first_key, AttentionShape s, Chunk c) {
  const int lane = threadIdx.x % kWarp;
  const WarpIndex w = warp_index();
  const int64_t rows = s.num_heads * c.queries;
  for (int64_t r = w.first; r < rows; r += w.count) {
    const int64_t i = c.query_begin + r % c.queries, token = c.sequence * s.seq_len + i;
    const int32_t sample_first = first_key == nullptr ? 0 : first_key[token];
    const ChunkRow x = chunk_row(r, c, sample_first, s.sliding_window);
    float* row = scores + r * c.keys;
    float max_score = -INFINITY;
    for (int64_t j = lane; j < c.keys; j += kWarp)
      if (j >= x.lo && j <= x.hi) max_score = fmaxf(max_score, row[j]);
    max_score = warp_max(max_score);
    float sum = 0.0f;
    for (int64_t j = lane; j < c.keys; j += kWarp) {
      if (j >= x.lo && j <= x.hi) {
        const float e = expf(row[j] - max_score);
        row[j] = e;
        sum += e;
      }
    }
    sum = warp_sum(sum);
    const float inverse = 1.0f / sum;
    for (int64_t j = lane; j < c.keys; j += kWarp)
      row[j] = j >= x.lo && j <= x.hi ? row[j] * inverse : 0.0f;
    if (lane == 0) {
      lse[(c.sequence * s.num_heads + x.head) * s.seq_len + i] = max_score + logf(sum);
      if (x.head == 0) saved_first[token] = sample_first;
    }
  }
}

// One warp per row of the chunk's recomputed scores: P = exp(S − lse) on the attended keys, 0
// elsewhere, in place.
__global__ void probability_rows_kernel(float* scores, const float* lse, const int32_t* saved_first,
                                        AttentionShape s, Chunk c) {
  const int lane = threadIdx.x % kWarp;
  const WarpIndex w = warp_index();
  const int64_t rows = s.num_heads * c.queries;
  for (int64_t r = w.first; r < rows; r += w.count) {
    const int64_t i = c.query_begin + r % c.queries, token = c.sequence * s.seq_len + i;
    const ChunkRow x = chunk_row(r, c, saved_first[token], s.sliding_window);
    const float row_lse = lse[(c.sequence * s.num_heads + x.head) * s.seq_len + i];
    float* row = scores + r * c.keys;
    for (int64_t j = lane; j < c.keys; j += kWarp)
      row[j] = j >= x.lo && j <= x.hi ? expf(row[j] - row_lse) : 0.0f;
  }
}

// One warp per row of the chunk: ds holds dP and receives dS = P∘(dP − Σ_j P·dP); P is 0 outside
// the attended keys, so the sum runs over the whole row and dS is 0 there too.
__global__ void softmax_backward_rows_kernel(float* ds, const float* probs, int64_t rows,
                                             int64_t keys) {
  const int lane = threadIdx.x % kWarp;
  const WarpIndex w = warp_index();
  for (int64_t r = w.first; r < rows; r += w.count) {
    const float* p = probs + r * keys;
    float* row = ds + r * keys;
    float dot = 0.0f;
    for (int64_t j = lane; j < keys; j += kWarp) dot += p[j] * row[j];
    dot = warp_sum(dot);
    for (int64_t j = lane; j < keys; j += kWarp) row[j] = p[j] * (row[j] - dot);
  }
}

unsigned warp_row_blocks(int64_t rows) { return blocks_for(rows * kWarp); }

// The plan's steps on the GPU: products through `handle`, kernels and fills on `stream`.
struct CudaSteps {
  cublasHandle_t handle;
  cudaStream_t stream;

  void gemm(const GemmArgs& args) { cuda::gemm(handle, args); }
  void fill_zero(float* data, int64_t floats) {
    LOMO_CUDA_CHECK(cudaMemsetAsync(data, 0, static_cast<size_t>(floats) * sizeof(float), stream));
  }
  void softmax_rows(float* scores, float* saved, const int32_t* first_key, const AttentionShape& s,
                    const Chunk& c) {
    softmax_rows_kernel<<<warp_row_blocks(s.num_heads * c.queries), kThreadsPerBlock, 0, stream>>>(
        scores, saved, attention_plan::saved_first_keys(saved, s), first_key, s, c);
    LOMO_CUDA_CHECK(cudaGetLastError());
  }
  void probability_rows(float* scores, const float* saved, const AttentionShape& s,
                        const Chunk& c) {
    probability_rows_kernel<<<warp_row_blocks(s.num_heads * c.queries), kThreadsPerBlock, 0,
                              stream>>>(scores, saved, attention_plan::saved_first_keys(saved, s),
                                        s, c);
    LOMO_CUDA_CHECK(cudaGetLastError());
  }
  void softmax_backward_rows(float* ds, const float* probs, const AttentionShape& s,
                             const Chunk& c) {
    const int64_t rows = s.num_heads * c.queries;
    softmax_backward_rows_kernel<<<warp_row_blocks(rows), kThreadsPerBlock, 0, stream>>>(
        ds, probs, rows, c.keys);
    LOMO_CUDA_CHECK(cudaGetLastError());
  }
};

}  // namespace

int64_t attention_saved_floats(const AttentionShape& shape) {
  return attention_plan::saved_floats(shape);
}

// Two regions of one chunk's [heads, C, ≤ T] tiles, C = attention_plan::chunk_rows(shape): the
// largest power of two ≤ min(T, 256) with 2·H·C·T ≤ 16 Mi floats (64 MiB), at least 16 (T if
// smaller).
int64_t attention_scratch_floats(const AttentionShape& shape) {
  return attention_plan::scratch_floats(shape, attention_plan::chunk_rows(shape));
}

void attention_forward(cublasHandle_t handle, float* out, float* saved, float* scratch,
                       const float* q, const float* k, const float* v, const int32_t* first_key,
                       const AttentionShape& shape, cudaStream_t stream) {
  CudaSteps steps{handle, stream};
  attention_plan::forward(steps, out, saved, scratch, q, k, v, first_key, shape,
                          attention_plan::chunk_rows(shape));
}

void attention_backward(cublasHandle_t handle, float* dq, float* dk, float* dv, float* scratch,
                        const float* dout, const float* saved, const float* q, const float* k,
                        const float* v, const AttentionShape& shape, cudaStream_t stream) {
  CudaSteps steps{handle, stream};
  attention_plan::backward(steps, dq, dk, dv, scratch, dout, saved, q, k, v, shape,
                           attention_plan::chunk_rows(shape));
}

}  // namespace lomo::cuda
