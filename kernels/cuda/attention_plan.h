// The plan CUDA attention runs: chunks of query rows, the per-head products of each chunk as
// strided-batched GemmArgs, and the order of products and row kernels. Host-only code, kept apart
// from the kernels so that a machine without a GPU can execute the very same plan with a reference
// GEMM and host row kernels (tests/unit/attention_plan_test.cc).
//
// Queries run in chunks of at most chunk_rows rows [c0, c1) of one sequence; a chunk attends only
// the keys [lo, c1), lo = 0 or, with a sliding window, c0 − window + 1: the masked upper triangle
// (and the keys before every window) is never computed, and scratch holds one chunk's scores
// [num_heads, rows, keys] instead of the T×T square. Forward saves each row's log-sum-exp, from
// which backward recomputes the probabilities chunk by chunk.
//
// Each product covers the query heads kv_head·group + g of one chunk, batched over the kv heads:
// for a fixed g the query heads, their score tiles and their kv heads all advance by a constant
// stride from one kv head to the next, which a single strided batch can express.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/host_device.h"
#include "kernels/kernel_types.h"

namespace lomo::cuda::attention_plan {

// ---- Sizes
// ----------------------------------------------------------------------------------------

// Chunk size rule: the largest power of two ≤ min(T, kMaxChunkRows) whose two scratch regions
// (2·num_heads·rows·T floats) fit kScratchBudgetFloats, but never below kMinChunkRows; T itself
// when T ≤ kMinChunkRows. At most 256 rows: from T = 512 on there are two or more chunks, which
// skip at least a quarter of the square, while each product (rows × keys × head_dim per head,
// batched over kv heads) stays large; 64 MiB keeps scratch a small part of a model's workspace
// (32 heads at T = 4096 → 64 rows).
inline constexpr int64_t kMaxChunkRows = 256;
inline constexpr int64_t kMinChunkRows = 16;
inline constexpr int64_t kScratchBudgetFloats = int64_t{16} << 20;  // 64 MiB of fp32

inline int64_t chunk_rows(const AttentionShape& s) {
  if (s.seq_len <= kMinChunkRows) return std::max<int64_t>(s.seq_len, 1);
  int64_t rows = kMaxChunkRows;
  while (rows > s.seq_len) rows /= 2;
  while (rows > kMinChunkRows && 2 * s.num_heads * rows * s.seq_len > kScratchBudgetFloats) {
    rows /= 2;
  }
  return rows;
}

// One scratch region: a chunk's [num_heads, rows, keys] tiles, keys ≤ T; rounded up to 64 floats
// so that region 2 starts 256-byte aligned, as cuBLAS's fastest kernels want.
inline int64_t region_floats(const AttentionShape& s, int64_t chunk_rows) {
  return (s.num_heads * std::min(chunk_rows, s.seq_len) * s.seq_len + 63) / 64 * 64;
}

// Scratch of forward and backward: region 1 (scores, then probabilities) and region 2 (dP, then
// dS); forward uses region 1 only.
inline int64_t scratch_floats(const AttentionShape& s, int64_t chunk_rows) {
  return 2 * region_floats(s, chunk_rows);
}

// What forward saves for backward: the log-sum-exp of every row [batch, num_heads, T], then each
// query's first key [batch·T] as int32 (first_key, or 0 without packing) so that backward masks
// exactly as forward did without being handed first_key again.
inline int64_t saved_floats(const AttentionShape& s) {
  return s.batch * s.num_heads * s.seq_len + s.batch * s.seq_len;
}
inline int32_t* saved_first_keys(float* saved, const AttentionShape& s) {
  return reinterpret_cast<int32_t*>(saved + s.batch * s.num_heads * s.seq_len);
}
inline const int32_t* saved_first_keys(const float* saved, const AttentionShape& s) {
  return reinterpret_cast<const int32_t*>(saved + s.batch * s.num_heads * s.seq_len);
}

// The first key query i attends to (the last is i itself): its sample's first key (packing),
// raised to i − window + 1 by a sliding window (window > 0). Row kernels and their host versions
// share this one definition.
LOMO_HOST_DEVICE inline int64_t first_attended_key(int64_t i, int64_t sample_first_key,
                                                   int64_t window) {
  return window > 0 && i - window + 1 > sample_first_key ? i - window + 1 : sample_first_key;
}

// ---- Chunks
// ---------------------------------------------------------------------------------------

// Query rows [query_begin, query_begin + queries) of sequence `sequence`, attending keys
// [key_begin, key_begin + keys); key_begin + keys = query_begin + queries (causal). Its scratch
// tiles are [num_heads, queries, keys], head h at h·queries·keys, leading dimension keys.
struct Chunk {
  int64_t sequence = 0;
  int64_t query_begin = 0, queries = 0;
  int64_t key_begin = 0, keys = 0;
};

inline Chunk chunk_at(const AttentionShape& s, int64_t sequence, int64_t query_begin,
                      int64_t chunk_rows) {
  Chunk c;
  c.sequence = sequence;
  c.query_begin = query_begin;
  c.queries = std::min(chunk_rows, s.seq_len - query_begin);
  // Every query of the chunk starts at or after the first one's window start.
  c.key_begin = s.sliding_window > 0 ? std::max<int64_t>(0, query_begin - s.sliding_window + 1) : 0;
  c.keys = query_begin + c.queries - c.key_begin;
  return c;
}

// ---- Products
// -------------------------------------------------------------------------------------

// One operand of a batched product: the first kv head's matrix, its leading dimension and the
// distance to the next kv head's matrix.
template <typename F>
struct View {
  F* data;
  int64_t ld, stride;
};

inline int64_t group_of(const AttentionShape& s) { return s.num_heads / s.num_kv_heads; }

// q, out, dout, dq [batch·T, num_heads·head_dim]: the chunk's query rows of head
// kv_head·group + g.
template <typename F>
View<F> query_view(F* x, const AttentionShape& s, const Chunk& c, int64_t g) {
  const int64_t width = s.num_heads * s.head_dim;
  return View<F>{x + (c.sequence * s.seq_len + c.query_begin) * width + g * s.head_dim, width,
                 group_of(s) * s.head_dim};
}

// k, v, dk, dv [batch·T, num_kv_heads·head_dim]: the chunk's keys of head kv_head.
template <typename F>
View<F> key_view(F* x, const AttentionShape& s, const Chunk& c) {
  const int64_t width = s.num_kv_heads * s.head_dim;
  return View<F>{x + (c.sequence * s.seq_len + c.key_begin) * width, width, s.head_dim};
}

// A scratch region's tile of head kv_head·group + g.
template <typename F>
View<F> tile_view(F* region, const Chunk& c, int64_t g, int64_t group) {
  const int64_t tile = c.queries * c.keys;
  return View<F>{region + g * tile, c.keys, group * tile};
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

template <typename F>
View<const float> as_const(View<F> v) {
  return View<const float>{v.data, v.ld, v.stride};
}

// S = scale·q_c·kᵀ into a region (forward, and backward's recomputation).
inline GemmArgs scores(float* region, const float* q, const float* k, const AttentionShape& s,
                       const Chunk& c, int64_t g, float scale) {
  return product(false, true, c.queries, c.keys, s.head_dim, scale, query_view(q, s, c, g),
                 key_view(k, s, c), 0.0f, tile_view(region, c, g, group_of(s)), s.num_kv_heads);
}

// out_c = P·v (P is 0 outside each row's attended keys).
inline GemmArgs weighted_values(float* out, const float* probs, const float* v,
                                const AttentionShape& s, const Chunk& c, int64_t g) {
  return product(false, false, c.queries, s.head_dim, c.keys, 1.0f,
                 tile_view(probs, c, g, group_of(s)), key_view(v, s, c), 0.0f,
                 query_view(out, s, c, g), s.num_kv_heads);
}

// dv += Pᵀ·dout_c (dv zero-filled first; chunks and heads add in plan order).
inline GemmArgs value_grad(float* dv, const float* probs, const float* dout,
                           const AttentionShape& s, const Chunk& c, int64_t g) {
  return product(true, false, c.keys, s.head_dim, c.queries, 1.0f,
                 tile_view(probs, c, g, group_of(s)), query_view(dout, s, c, g), 1.0f,
                 key_view(dv, s, c), s.num_kv_heads);
}

// dP = dout_c·vᵀ into region 2.
inline GemmArgs prob_grad(float* region, const float* dout, const float* v, const AttentionShape& s,
                          const Chunk& c, int64_t g) {
  return product(false, true, c.queries, c.keys, s.head_dim, 1.0f, query_view(dout, s, c, g),
                 key_view(v, s, c), 0.0f, tile_view(region, c, g, group_of(s)), s.num_kv_heads);
}

// dq_c = scale·dS·k: overwrites, each query row belongs to one chunk.
inline GemmArgs query_grad(float* dq, const float* ds, const float* k, const AttentionShape& s,
                           const Chunk& c, int64_t g, float scale) {
  return product(false, false, c.queries, s.head_dim, c.keys, scale,
                 tile_view(ds, c, g, group_of(s)), key_view(k, s, c), 0.0f, query_view(dq, s, c, g),
                 s.num_kv_heads);
}

// dk += scale·dSᵀ·q_c (dk zero-filled first; chunks and heads add in plan order).
inline GemmArgs key_grad(float* dk, const float* ds, const float* q, const AttentionShape& s,
                         const Chunk& c, int64_t g, float scale) {
  return product(true, false, c.keys, s.head_dim, c.queries, scale,
                 tile_view(ds, c, g, group_of(s)), query_view(q, s, c, g), 1.0f, key_view(dk, s, c),
                 s.num_kv_heads);
}

// ---- Order
// ----------------------------------------------------------------------------------------
//
// Ops executes the steps (attention.cu: cuBLAS and warp-per-row kernels on one stream; the plan
// test: a reference GEMM and host loops):
//   gemm(const GemmArgs&)
//   fill_zero(float* data, int64_t floats)
//   softmax_rows(float* region, float* saved, const int32_t* first_key, shape, chunk):
//     masks the chunk's scores, softmax in place (0 outside [first attended key, i]), writes
//     each row's log-sum-exp, and for head 0 the row's first key, into saved.
//   probability_rows(float* region, const float* saved, shape, chunk):
//     scores → exp(S − lse), 0 outside the attended keys.
//   softmax_backward_rows(float* ds, const float* probs, shape, chunk):
//     dP → dS = P∘(dP − Σ_j P·dP) in place (the chunk holds whole rows, so the sum is exact).
// Products and row kernels run in a fixed order and dk/dv accumulate with beta = 1 in that order,
// so a deterministic Ops gives the same bits on every run.

inline float scale_of(const AttentionShape& s) {
  return 1.0f / std::sqrt(static_cast<float>(s.head_dim));
}

inline bool empty(const AttentionShape& s) {
  return s.batch == 0 || s.seq_len == 0 || s.num_heads == 0 || s.head_dim == 0;
}

template <typename Ops>
void forward(Ops& ops, float* out, float* saved, float* scratch, const float* q, const float* k,
             const float* v, const int32_t* first_key, const AttentionShape& s,
             int64_t chunk_rows) {
  if (empty(s)) return;
  const float scale = scale_of(s);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t c0 = 0; c0 < s.seq_len; c0 += chunk_rows) {
      const Chunk c = chunk_at(s, b, c0, chunk_rows);
      for (int64_t g = 0; g < group_of(s); ++g) ops.gemm(scores(scratch, q, k, s, c, g, scale));
      ops.softmax_rows(scratch, saved, first_key, s, c);
      for (int64_t g = 0; g < group_of(s); ++g) ops.gemm(weighted_values(out, scratch, v, s, c, g));
    }
  }
}

template <typename Ops>
void backward(Ops& ops, float* dq, float* dk, float* dv, float* scratch, const float* dout,
              const float* saved, const float* q, const float* k, const float* v,
              const AttentionShape& s, int64_t chunk_rows) {
  if (empty(s)) return;
  const float scale = scale_of(s);
  const int64_t kv_floats = s.batch * s.seq_len * s.num_kv_heads * s.head_dim;
  ops.fill_zero(dk, kv_floats);
  ops.fill_zero(dv, kv_floats);
  float* probs = scratch;
  float* ds = scratch + region_floats(s, chunk_rows);
  // Stream order keeps the next chunk's scores from overwriting tiles the products still read.
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t c0 = 0; c0 < s.seq_len; c0 += chunk_rows) {
      const Chunk c = chunk_at(s, b, c0, chunk_rows);
      for (int64_t g = 0; g < group_of(s); ++g) ops.gemm(scores(probs, q, k, s, c, g, scale));
      ops.probability_rows(probs, saved, s, c);
      for (int64_t g = 0; g < group_of(s); ++g) {
        ops.gemm(value_grad(dv, probs, dout, s, c, g));
        ops.gemm(prob_grad(ds, dout, v, s, c, g));
      }
      ops.softmax_backward_rows(ds, probs, s, c);
      for (int64_t g = 0; g < group_of(s); ++g) {
        ops.gemm(query_grad(dq, ds, k, s, c, g, scale));
        ops.gemm(key_grad(dk, ds, q, s, c, g, scale));
      }
    }
  }
}

}  // namespace lomo::cuda::attention_plan
