// Causal grouped-query attention with the probabilities materialised (kernels/cpu/attention.h has
// the layouts). Every sum runs in a fixed order (warp shuffles of a fixed shape, warps combined in
// index order, keys and queries looped in order) and no two threads write one element: the results
// are the same bits on every run, with no atomics.
//
// Forward: one block per (batch, head, query row): the scores of the attended keys (a warp per
// key, lanes over head_dim), softmax into the probs row, then out = probs·v with threads over
// head_dim. Backward, one sequence at a time so that scratch holds one sequence's dS: a block per
// (head, query row) computes dP = dout·vᵀ, dS = P∘(dP − rowsum(P∘dP)) into scratch and
// dq = scale·dS·k; then a block per (kv head, key row) sums dk = scale·dSᵀ·q and dv = Pᵀ·dout over
// the group's heads and the later queries in order, so the group needs no atomics.
//
// A faster version would tile several query rows per block so that one load of k and v serves
// them all (or drop probs for a flash-style kernel, which needs a seam change).
#include <cmath>
#include <stdexcept>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_check.h"

namespace lomo::cuda {
namespace {

constexpr int kWarp = 32;
// Threads of the row kernels: keys are spread over its warps, head_dim over its threads.
constexpr int kRowThreads = 128;
constexpr int kMaxColumnThreads = 256;
// Shared memory a block may use without opting in, less room for the kernels' static arrays.
constexpr int64_t kDynamicSharedBytes = 47 * 1024;

// Floats per token row of q/out/dout and of k/v.
struct Strides {
  int64_t q_row, kv_row;
};

__device__ Strides strides_of(const AttentionShape& s) {
  return Strides{s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim};
}

__device__ float warp_sum(float value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;  // every lane holds the same total
}

// Combines one value per warp (the same in every lane) across the block in warp order. Its barriers
// make every write made before the call visible to the block and let the caller reuse `shared`.
template <bool kMax>
__device__ float block_combine(float warp_value, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = warp_value;
  __syncthreads();
  float total = shared[0];
  for (int w = 1; w < static_cast<int>(blockDim.x) / kWarp; ++w)
    total = kMax ? fmaxf(total, shared[w]) : total + shared[w];
  __syncthreads();
  return total;
}

// q_row·k_row over head_dim by one warp (q_row in shared memory); every lane gets the result.
__device__ float warp_dot(const float* shared_row, const float* row, int64_t head_dim) {
  float partial = 0.0f;
  for (int64_t d = threadIdx.x % kWarp; d < head_dim; d += kWarp) partial += shared_row[d] * row[d];
  return warp_sum(partial);
}

// One block per (batch, head, query) row r = (b·num_heads + h)·T + i, whose probs row is
// probs + r·T. Grid-stride over rows; the loop condition is uniform over the block, so the
// barriers inside are safe.
__global__ void attention_forward_kernel(float* out, float* probs, const float* q, const float* k,
                                         const float* v, const int32_t* first_key, AttentionShape s,
                                         float scale) {
  extern __shared__ float q_shared[];  // head_dim floats
  __shared__ float reduce_shared[kRowThreads / kWarp];
  const int64_t T = s.seq_len, D = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const Strides st = strides_of(s);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int64_t rows = s.batch * s.num_heads * T;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t i = r % T, h = (r / T) % s.num_heads, b = r / (T * s.num_heads);
    const int64_t start = first_key == nullptr ? 0 : first_key[b * T + i];
    const float* q_row = q + (b * T + i) * st.q_row + h * D;
    const float* k_head = k + b * T * st.kv_row + (h / group) * D;
    const float* v_head = v + b * T * st.kv_row + (h / group) * D;
    float* p = probs + r * T;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) q_shared[d] = q_row[d];
    __syncthreads();
    float max_score = -INFINITY;
    for (int64_t j = start + warp; j <= i; j += warps) {
      const float score = scale * warp_dot(q_shared, k_head + j * st.kv_row, D);
      if (lane == 0) p[j] = score;
      max_score = fmaxf(max_score, score);
    }
    max_score = block_combine<true>(max_score, reduce_shared);  // also publishes p[start..i]
    float sum = 0.0f;
    for (int64_t j = start + threadIdx.x; j <= i; j += blockDim.x) {
      const float e = expf(p[j] - max_score);
      p[j] = e;
      sum += e;
    }
    const float inverse = 1.0f / block_combine<false>(warp_sum(sum), reduce_shared);
    // Each thread rescales the entries it wrote, and zeroes the rest of the row.
    for (int64_t j = start + threadIdx.x; j <= i; j += blockDim.x) p[j] *= inverse;
    for (int64_t j = threadIdx.x; j < start; j += blockDim.x) p[j] = 0.0f;
    for (int64_t j = i + 1 + threadIdx.x; j < T; j += blockDim.x) p[j] = 0.0f;
    __syncthreads();  // the normalised row is visible to the whole block
    float* out_row = out + (b * T + i) * st.q_row + h * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float total = 0.0f;
      for (int64_t j = start; j <= i; ++j) total += p[j] * v_head[j * st.kv_row + d];
      out_row[d] = total;
    }
    __syncthreads();  // q_shared is reloaded by the next row
  }
}

// Backward over the rows of sequence b: r = h·T + i. scratch row r (T floats) receives dS for keys
// 0..i (unscaled); dq = scale·dS·k. Probabilities of 0 mark keys outside the attended range: their
// dS is 0 and they are skipped.
__global__ void attention_backward_rows_kernel(float* dq, float* scratch, const float* dout,
                                               const float* probs, const float* k, const float* v,
                                               AttentionShape s, int64_t b, float scale) {
  extern __shared__ float dout_shared[];  // head_dim floats
  __shared__ float reduce_shared[kRowThreads / kWarp];
  const int64_t T = s.seq_len, D = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const Strides st = strides_of(s);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int64_t rows = s.num_heads * T;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t i = r % T, h = r / T;
    const float* p = probs + (b * s.num_heads * T + r) * T;
    float* ds = scratch + r * T;
    const float* dout_row = dout + (b * T + i) * st.q_row + h * D;
    const float* k_head = k + b * T * st.kv_row + (h / group) * D;
    const float* v_head = v + b * T * st.kv_row + (h / group) * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dout_shared[d] = dout_row[d];
    __syncthreads();
    // dP = dout·vᵀ over the attended keys, and Σ_j P·dP.
    float weighted = 0.0f;
    for (int64_t j = warp; j <= i; j += warps) {
      const float pj = p[j];
      const float dp = pj == 0.0f ? 0.0f : warp_dot(dout_shared, v_head + j * st.kv_row, D);
      if (lane == 0) ds[j] = dp;
      weighted += pj * dp;
    }
    const float dot = block_combine<false>(weighted, reduce_shared);  // also publishes ds[0..i]
    for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) ds[j] = p[j] * (ds[j] - dot);
    __syncthreads();
    float* dq_row = dq + (b * T + i) * st.q_row + h * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float total = 0.0f;
      for (int64_t j = 0; j <= i; ++j) {
        const float dsj = ds[j];
        if (dsj != 0.0f) total += dsj * k_head[j * st.kv_row + d];
      }
      dq_row[d] = scale * total;
    }
    __syncthreads();  // dout_shared is reloaded by the next row
  }
}

// dk and dv of sequence b: one block per (kv head, key j), threads over head_dim, summing the
// group's heads and the queries i >= j in order.
__global__ void attention_backward_keys_kernel(float* dk, float* dv, const float* scratch,
                                               const float* dout, const float* probs,
                                               const float* q, AttentionShape s, int64_t b,
                                               float scale) {
  const int64_t T = s.seq_len, D = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const Strides st = strides_of(s);
  const int64_t rows = s.num_kv_heads * T;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t j = r % T, kv_head = r / T;
    const int64_t kv_offset = (b * T + j) * st.kv_row + kv_head * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float dk_total = 0.0f, dv_total = 0.0f;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kv_head * group + g;
        const float* p_column = probs + (b * s.num_heads + h) * T * T + j;
        const float* ds_column = scratch + h * T * T + j;
        const float* q_head = q + b * T * st.q_row + h * D + d;
        const float* dout_head = dout + b * T * st.q_row + h * D + d;
        for (int64_t i = j; i < T; ++i) {
          const float pij = p_column[i * T];
          if (pij == 0.0f) continue;  // outside the attended range: dS is 0 as well
          dv_total += pij * dout_head[i * st.q_row];
          dk_total += ds_column[i * T] * q_head[i * st.q_row];
        }
      }
      dk[kv_offset + d] = scale * dk_total;
      dv[kv_offset + d] = dv_total;
    }
  }
}

// Blocks for a block-per-row kernel: one per row, capped (the kernels loop over the rest).
unsigned row_blocks(int64_t rows) {
  constexpr int64_t kMaxBlocks = 1 << 30;
  return static_cast<unsigned>(rows < kMaxBlocks ? rows : kMaxBlocks);
}

// Threads over head_dim: a whole number of warps, at most kMaxColumnThreads.
int column_threads(int64_t head_dim) {
  const int64_t warps = (head_dim + kWarp - 1) / kWarp;
  const int64_t threads = warps * kWarp;
  return static_cast<int>(threads < kMaxColumnThreads ? threads : kMaxColumnThreads);
}

size_t row_shared_bytes(const AttentionShape& s) {
  const int64_t bytes = s.head_dim * static_cast<int64_t>(sizeof(float));
  if (bytes > kDynamicSharedBytes) throw std::invalid_argument("attention: head_dim too large");
  return static_cast<size_t>(bytes);
}

float scale_of(const AttentionShape& s) { return 1.0f / std::sqrt(static_cast<float>(s.head_dim)); }

bool empty(const AttentionShape& s) {
  return s.batch == 0 || s.seq_len == 0 || s.num_heads == 0 || s.head_dim == 0;
}

}  // namespace

void attention_forward(float* out, float* probs, const float* q, const float* k, const float* v,
                       const int32_t* first_key, const AttentionShape& shape, cudaStream_t stream) {
  if (empty(shape)) return;
  const int64_t rows = shape.batch * shape.num_heads * shape.seq_len;
  attention_forward_kernel<<<row_blocks(rows), kRowThreads, row_shared_bytes(shape), stream>>>(
      out, probs, q, k, v, first_key, shape, scale_of(shape));
  LOMO_CUDA_CHECK(cudaGetLastError());
}

// dS of one sequence: the backward runs the sequences in turn.
int64_t attention_backward_scratch_floats(const AttentionShape& shape) {
  return shape.num_heads * shape.seq_len * shape.seq_len;
}

void attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                        const float* probs, const float* q, const float* k, const float* v,
                        const AttentionShape& shape, cudaStream_t stream) {
  if (empty(shape)) return;
  const float scale = scale_of(shape);
  const size_t shared = row_shared_bytes(shape);
  for (int64_t b = 0; b < shape.batch; ++b) {
    // Stream order keeps the next sequence's dS from overwriting scratch the keys kernel reads.
    attention_backward_rows_kernel<<<row_blocks(shape.num_heads * shape.seq_len), kRowThreads,
                                     shared, stream>>>(dq, scratch, dout, probs, k, v, shape, b,
                                                       scale);
    LOMO_CUDA_CHECK(cudaGetLastError());
    attention_backward_keys_kernel<<<row_blocks(shape.num_kv_heads * shape.seq_len),
                                     column_threads(shape.head_dim), 0, stream>>>(
        dk, dv, scratch, dout, probs, q, shape, b, scale);
    LOMO_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace lomo::cuda
