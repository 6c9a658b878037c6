#include "kernels/cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/fast_exp.h"
#include "kernels/cpu/matmul.h"

namespace lomo::cpu {
namespace {

// Row-major views of one head: rows of this sequence, the head's columns, the tensor's row stride.
struct HeadView {
  int64_t q_offset, kv_offset, q_stride, kv_stride;
};

// Causal blocking: query rows i in [i0, i0 + n) see keys [0, i0 + n) only, so the products run
// over blocks of kBlock rows and skip the masked upper triangle (about half the FLOPs at T = 256).
// 64 rows keep each product large enough for the GEMM library's kernels.
constexpr int64_t kBlock = 64;

HeadView head_view(const AttentionShape& s, int64_t b, int64_t h) {
  const int64_t group = s.num_heads / s.num_kv_heads;
  const int64_t q_stride = s.num_heads * s.head_dim;
  const int64_t kv_stride = s.num_kv_heads * s.head_dim;
  return HeadView{b * s.seq_len * q_stride + h * s.head_dim,
                  b * s.seq_len * kv_stride + (h / group) * s.head_dim, q_stride, kv_stride};
}

}  // namespace

void attention_forward(float* out, float* probs, const float* q, const float* k, const float* v,
                       const int32_t* first_key, const AttentionShape& s) {
  const int64_t T = s.seq_len;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  // One (sequence, head) per iteration; BLAS runs single-threaded inside the parallel region.
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < s.batch * s.num_heads; ++bh) {
    const int64_t b = bh / s.num_heads, h = bh % s.num_heads;
    const HeadView view = head_view(s, b, h);
    float* p = probs + bh * T * T;
    // Scores of each block of queries against the keys it can see; the softmax below writes the
    // masked entries (never computed) as 0.
    for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
      const int64_t n = std::min(kBlock, T - i0);
      gemm(false, true, n, i0 + n, s.head_dim, scale, q + view.q_offset + i0 * view.q_stride,
           view.q_stride, k + view.kv_offset, view.kv_stride, 0.0f, p + i0 * T, T);
    }
    const int32_t* starts = first_key == nullptr ? nullptr : first_key + b * T;
    for (int64_t i = 0; i < T; ++i) {
      float* row = p + i * T;
      int64_t start = starts == nullptr ? 0 : starts[i];
      if (s.sliding_window > 0) start = std::max(start, i - s.sliding_window + 1);
      for (int64_t j = 0; j < start; ++j) row[j] = 0.0f;
      float max_score = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max_score)
      for (int64_t j = start; j <= i; ++j) max_score = std::fmax(max_score, row[j]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = start; j <= i; ++j) {
        row[j] = fast_exp(row[j] - max_score);
        sum += row[j];
      }
      const float inverse = 1.0f / sum;
#pragma omp simd
      for (int64_t j = start; j <= i; ++j) row[j] *= inverse;
      for (int64_t j = i + 1; j < T; ++j) row[j] = 0.0f;
    }
    for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
      const int64_t n = std::min(kBlock, T - i0);
      gemm(false, false, n, s.head_dim, i0 + n, 1.0f, p + i0 * T, T, v + view.kv_offset,
           view.kv_stride, 0.0f, out + view.q_offset + i0 * view.q_stride, view.q_stride);
    }
  }
}

int64_t attention_backward_scratch_floats(const AttentionShape& s) {
  return static_cast<int64_t>(omp_get_max_threads()) * s.seq_len * s.seq_len;
}

void attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                        const float* probs, const float* q, const float* k, const float* v,
                        const AttentionShape& s) {
  const int64_t T = s.seq_len;
  const int64_t group = s.num_heads / s.num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  // Parallel over (sequence, kv head): the query heads of a group accumulate into the same dk/dv,
  // so they run in order inside one iteration and no two threads write the same rows.
#pragma omp parallel for schedule(dynamic)
  for (int64_t bg = 0; bg < s.batch * s.num_kv_heads; ++bg) {
    const int64_t b = bg / s.num_kv_heads, kv_head = bg % s.num_kv_heads;
    float* ds = scratch + static_cast<int64_t>(omp_get_thread_num()) * T * T;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kv_head * group + g;
      const HeadView view = head_view(s, b, h);
      const float* p = probs + (b * s.num_heads + h) * T * T;
      const float accumulate = g == 0 ? 0.0f : 1.0f;
      // dV (+)= Pᵀ·dO, by blocks of keys j in [j0, j0 + n): only queries i >= j0 see them.
      for (int64_t j0 = 0; j0 < T; j0 += kBlock) {
        const int64_t n = std::min(kBlock, T - j0);
        gemm(true, false, n, s.head_dim, T - j0, 1.0f, p + j0 * T + j0, T,
             dout + view.q_offset + j0 * view.q_stride, view.q_stride, accumulate,
             dv + view.kv_offset + j0 * view.kv_stride, view.kv_stride);
      }
      // dP = dO·Vᵀ (the visible keys of each query block), then dS = P∘(dP − rowsum(P∘dP)), the
      // softmax backward.
      for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
        const int64_t n = std::min(kBlock, T - i0);
        gemm(false, true, n, i0 + n, s.head_dim, 1.0f, dout + view.q_offset + i0 * view.q_stride,
             view.q_stride, v + view.kv_offset, view.kv_stride, 0.0f, ds + i0 * T, T);
      }
      for (int64_t i = 0; i < T; ++i) {
        const float* prow = p + i * T;
        float* row = ds + i * T;
        // Probabilities outside [first key, i] (and the sliding window) are exactly 0, so their dS
        // is 0 too.
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j <= i; ++j) dot += prow[j] * row[j];
#pragma omp simd
        for (int64_t j = 0; j <= i; ++j) row[j] = prow[j] * (row[j] - dot);
        for (int64_t j = i + 1; j < T; ++j) row[j] = 0.0f;
      }
      // dQ = scale·dS·K by query blocks; dK (+)= scale·dSᵀ·Q by key blocks.
      for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
        const int64_t n = std::min(kBlock, T - i0);
        gemm(false, false, n, s.head_dim, i0 + n, scale, ds + i0 * T, T, k + view.kv_offset,
             view.kv_stride, 0.0f, dq + view.q_offset + i0 * view.q_stride, view.q_stride);
      }
      for (int64_t j0 = 0; j0 < T; j0 += kBlock) {
        const int64_t n = std::min(kBlock, T - j0);
        gemm(true, false, n, s.head_dim, T - j0, scale, ds + j0 * T + j0, T,
             q + view.q_offset + j0 * view.q_stride, view.q_stride, accumulate,
             dk + view.kv_offset + j0 * view.kv_stride, view.kv_stride);
      }
    }
  }
}

}  // namespace lomo::cpu
