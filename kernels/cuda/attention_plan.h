// The per-head products CUDA attention is built from, as strided-batched GemmArgs (host-only code,
// kept apart from the kernels so that its stride arithmetic can be checked on a machine without a
// GPU). Each product covers the query heads kv_head·group + g of one sequence b, batched over the
// kv heads: for a fixed g the query heads, their probs tiles and their kv heads all advance by a
// constant stride from one kv head to the next, which a single strided batch can express.
#pragma once

#include <cstdint>

#include "kernels/kernel_types.h"

namespace lomo::cuda::attention_plan {

// One operand of a batched product: the first kv head's matrix, its leading dimension and the
// distance to the next kv head's matrix.
template <typename F>
struct View {
  F* data;
  int64_t ld, stride;
};

inline int64_t group_of(const AttentionShape& s) { return s.num_heads / s.num_kv_heads; }

// q, out, dout, dq [batch·T, num_heads·head_dim]: head kv_head·group + g of sequence b.
template <typename F>
View<F> query_view(F* x, const AttentionShape& s, int64_t b, int64_t g) {
  const int64_t row = s.num_heads * s.head_dim;
  return View<F>{x + b * s.seq_len * row + g * s.head_dim, row, group_of(s) * s.head_dim};
}

// k, v, dk, dv [batch·T, num_kv_heads·head_dim]: head kv_head of sequence b.
template <typename F>
View<F> key_view(F* x, const AttentionShape& s, int64_t b) {
  const int64_t row = s.num_kv_heads * s.head_dim;
  return View<F>{x + b * s.seq_len * row, row, s.head_dim};
}

// probs [batch, num_heads, T, T]: the tile of head kv_head·group + g of sequence b.
template <typename F>
View<F> probs_view(F* probs, const AttentionShape& s, int64_t b, int64_t g) {
  const int64_t tile = s.seq_len * s.seq_len;
  return View<F>{probs + (b * s.num_heads + g) * tile, s.seq_len, group_of(s) * tile};
}

// The backward's scratch [num_heads, T, T] holds one sequence's dP, then dS: head
// kv_head·group + g.
inline View<float> scratch_view(float* scratch, const AttentionShape& s, int64_t g) {
  const int64_t tile = s.seq_len * s.seq_len;
  return View<float>{scratch + g * tile, s.seq_len, group_of(s) * tile};
}

// C = alpha·op(A)·op(B) + beta·C for every kv head.
inline GemmArgs product(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
                        float alpha, View<const float> a, View<const float> b, float beta,
                        View<float> c, int64_t batch) {
  GemmArgs g;
  g.transpose_a = transpose_a, g.transpose_b = transpose_b;
  g.m = m, g.n = n, g.k = k;
  g.alpha = alpha, g.beta = beta;
  g.a = a.data, g.lda = a.ld, g.stride_a = a.stride;
  g.b = b.data, g.ldb = b.ld, g.stride_b = b.stride;
  g.c = c.data, g.ldc = c.ld, g.stride_c = c.stride;
  g.batch = batch;
  return g;
}

// Forward, scores: probs = scale·q·kᵀ over the whole T×T tile (the row kernel masks it).
inline GemmArgs scores(float* probs, const float* q, const float* k, const AttentionShape& s,
                       int64_t b, int64_t g, float scale) {
  return product(false, true, s.seq_len, s.seq_len, s.head_dim, scale, query_view(q, s, b, g),
                 key_view(k, s, b), 0.0f, probs_view(probs, s, b, g), s.num_kv_heads);
}

// Forward, out = P·v (P is 0 outside the attended range).
inline GemmArgs weighted_values(float* out, const float* probs, const float* v,
                                const AttentionShape& s, int64_t b, int64_t g) {
  return product(false, false, s.seq_len, s.head_dim, s.seq_len, 1.0f, probs_view(probs, s, b, g),
                 key_view(v, s, b), 0.0f, query_view(out, s, b, g), s.num_kv_heads);
}

// Backward, dv (+)= Pᵀ·dout: g = 0 overwrites, the group's later heads add in order.
inline GemmArgs value_grad(float* dv, const float* probs, const float* dout,
                           const AttentionShape& s, int64_t b, int64_t g) {
  return product(true, false, s.seq_len, s.head_dim, s.seq_len, 1.0f, probs_view(probs, s, b, g),
                 query_view(dout, s, b, g), g == 0 ? 0.0f : 1.0f, key_view(dv, s, b),
                 s.num_kv_heads);
}

// Backward, dP = dout·vᵀ into scratch.
inline GemmArgs prob_grad(float* scratch, const float* dout, const float* v,
                          const AttentionShape& s, int64_t b, int64_t g) {
  return product(false, true, s.seq_len, s.seq_len, s.head_dim, 1.0f, query_view(dout, s, b, g),
                 key_view(v, s, b), 0.0f, scratch_view(scratch, s, g), s.num_kv_heads);
}

// Backward, dq = scale·dS·k (dS in scratch, 0 outside the attended range).
inline GemmArgs query_grad(float* dq, float* scratch, const float* k, const AttentionShape& s,
                           int64_t b, int64_t g, float scale) {
  const View<float> ds = scratch_view(scratch, s, g);
  return product(false, false, s.seq_len, s.head_dim, s.seq_len, scale,
                 View<const float>{ds.data, ds.ld, ds.stride}, key_view(k, s, b), 0.0f,
                 query_view(dq, s, b, g), s.num_kv_heads);
}

// Backward, dk (+)= scale·dSᵀ·q: g = 0 overwrites, the group's later heads add in order.
inline GemmArgs key_grad(float* dk, float* scratch, const float* q, const AttentionShape& s,
                         int64_t b, int64_t g, float scale) {
  const View<float> ds = scratch_view(scratch, s, g);
  return product(true, false, s.seq_len, s.head_dim, s.seq_len, scale,
                 View<const float>{ds.data, ds.ld, ds.stride}, query_view(q, s, b, g),
                 g == 0 ? 0.0f : 1.0f, key_view(dk, s, b), s.num_kv_heads);
}

}  // namespace lomo::cuda::attention_plan
