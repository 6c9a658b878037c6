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
    // Scores for the whole square; the upper triangle is masked below. Causal blocking would
    // halve these FLOPs; it is a later optimisation.
    gemm(false, true, T, T, s.head_dim, scale, q + view.q_offset, view.q_stride, k + view.kv_offset,
         view.kv_stride, 0.0f, p, T);
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
    gemm(false, false, T, s.head_dim, T, 1.0f, p, T, v + view.kv_offset, view.kv_stride, 0.0f,
         out + view.q_offset, view.q_stride);
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
      // dV (+)= Pᵀ·dO
      gemm(true, false, T, s.head_dim, T, 1.0f, p, T, dout + view.q_offset, view.q_stride,
           accumulate, dv + view.kv_offset, view.kv_stride);
      // dP = dO·Vᵀ, then dS = P∘(dP − rowsum(P∘dP)), the softmax backward.
      gemm(false, true, T, T, s.head_dim, 1.0f, dout + view.q_offset, view.q_stride,
           v + view.kv_offset, view.kv_stride, 0.0f, ds, T);
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
      // dQ = scale·dS·K ; dK (+)= scale·dSᵀ·Q
      gemm(false, false, T, s.head_dim, T, scale, ds, T, k + view.kv_offset, view.kv_stride, 0.0f,
           dq + view.q_offset, view.q_stride);
      gemm(true, false, T, s.head_dim, T, scale, ds, T, q + view.q_offset, view.q_stride,
           accumulate, dk + view.kv_offset, view.kv_stride);
    }
  }
}

}  // namespace lomo::cpu
