#include "kernels/cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/fast_exp.h"
#include "kernels/cpu/matmul.h"

namespace lomo::cpu {
namespace {

// Causal blocking: query rows i in [i0, i0 + n) see keys before i0 + n only, so the products run
// over blocks of kBlock rows and skip the masked upper triangle (about half the FLOPs at T = 256),
// and a thread's scores are one kBlock × T tile instead of the T×T square. 64 rows keep each
// product large enough for the GEMM library's kernels and a tile within L2 up to T ≈ 4096.
constexpr int64_t kBlock = 64;

// Row-major views of one head: rows of this sequence, the head's columns, the tensor's row stride.
struct HeadView {
  int64_t q_offset, kv_offset, q_stride, kv_stride;
  // Element offsets of query row i (in q, dq, out, dout) and key row j (in k, v, dk, dv).
  int64_t q_row(int64_t i) const { return q_offset + i * q_stride; }
  int64_t kv_row(int64_t j) const { return kv_offset + j * kv_stride; }
};

HeadView head_view(const AttentionShape& s, int64_t b, int64_t h) {
  const int64_t group = s.num_heads / s.num_kv_heads;
  const int64_t q_stride = s.num_heads * s.head_dim;
  const int64_t kv_stride = s.num_kv_heads * s.head_dim;
  return HeadView{b * s.seq_len * q_stride + h * s.head_dim,
                  b * s.seq_len * kv_stride + (h / group) * s.head_dim, q_stride, kv_stride};
}

// The first key query i attends to (the last is i itself): its sample's first key (packing),
// raised to i − window + 1 by a sliding window (window > 0).
int64_t first_attended_key(int64_t i, int32_t sample_first_key, int64_t window) {
  const int64_t start = sample_first_key;
  return window > 0 ? std::max(start, i - window + 1) : start;
}

// Query rows [query_begin, query_begin + queries) attending keys [key_begin, key_begin + keys),
// key_begin + keys = query_begin + queries: keys before every row's first attended key (packed
// samples, sliding windows) are skipped too. Its tiles are [queries, keys], leading dimension keys.
struct Block {
  int64_t query_begin, queries, key_begin, keys;
};

// `first`: the sequence's saved first keys [seq_len].
Block block_at(const AttentionShape& s, const int32_t* first, int64_t query_begin,
               int64_t block_rows) {
  const int64_t queries = std::min(block_rows, s.seq_len - query_begin);
  int64_t key_begin = query_begin;
  for (int64_t i = query_begin; i < query_begin + queries; ++i) {
    key_begin = std::min(key_begin, first_attended_key(i, first[i], s.sliding_window));
  }
  return Block{query_begin, queries, key_begin, query_begin + queries - key_begin};
}

// Columns [lo, hi] of a block row are its attended keys.
struct Span {
  int64_t lo, hi;
};

Span attended(const Block& block, int64_t r, const int32_t* first, int64_t window) {
  const int64_t i = block.query_begin + r;
  return Span{first_attended_key(i, first[i], window) - block.key_begin, i - block.key_begin};
}

// Softmax in place over each row's attended columns, 0 elsewhere; lse[i] (the sequence's row
// log-sum-exps for this head) receives max + log(sum).
void softmax_rows(float* tile, float* lse, const int32_t* first, const Block& block,
                  int64_t window) {
  for (int64_t r = 0; r < block.queries; ++r) {
    float* row = tile + r * block.keys;
    const Span a = attended(block, r, first, window);
    float max_score = -std::numeric_limits<float>::infinity();
    // A comparison, not std::fmax: GCC 12 calls libm's fmaxf in the loop's scalar remainder, a
    // sixth of the forward pass at T = 256. NaN scores are skipped either way.
#pragma omp simd reduction(max : max_score)
    for (int64_t j = a.lo; j <= a.hi; ++j) max_score = row[j] > max_score ? row[j] : max_score;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = a.lo; j <= a.hi; ++j) {
      row[j] = fast_exp(row[j] - max_score);
      sum += row[j];
    }
    const float inverse = 1.0f / sum;
    std::fill(row, row + a.lo, 0.0f);
#pragma omp simd
    for (int64_t j = a.lo; j <= a.hi; ++j) row[j] *= inverse;
    std::fill(row + a.hi + 1, row + block.keys, 0.0f);
    lse[block.query_begin + r] = max_score + std::log(sum);
  }
}

// The softmax backward of a block: scores S → probabilities P = exp(S − lse) and dP → dS =
// P∘(dP − Σ_j P·dP), in place, both 0 outside the attended columns. A block holds whole rows, so
// the sum is exact. One pass makes P and its dot product with dP.
void softmax_backward_rows(float* probs, float* ds, const float* lse, const int32_t* first,
                           const Block& block, int64_t window) {
  for (int64_t r = 0; r < block.queries; ++r) {
    float* p = probs + r * block.keys;
    float* row = ds + r * block.keys;
    const Span a = attended(block, r, first, window);
    const float row_lse = lse[block.query_begin + r];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = a.lo; j <= a.hi; ++j) {
      p[j] = fast_exp(p[j] - row_lse);
      dot += p[j] * row[j];
    }
#pragma omp simd
    for (int64_t j = a.lo; j <= a.hi; ++j) row[j] = p[j] * (row[j] - dot);
    for (float* x : {p, row}) {
      std::fill(x, x + a.lo, 0.0f);
      std::fill(x + a.hi + 1, x + block.keys, 0.0f);
    }
  }
}

bool empty(const AttentionShape& s) {
  return s.batch == 0 || s.seq_len == 0 || s.num_heads == 0 || s.head_dim == 0;
}

int32_t* saved_first_keys(float* saved, const AttentionShape& s) {
  return reinterpret_cast<int32_t*>(saved + s.batch * s.num_heads * s.seq_len);
}
const int32_t* saved_first_keys(const float* saved, const AttentionShape& s) {
  return reinterpret_cast<const int32_t*>(saved + s.batch * s.num_heads * s.seq_len);
}

// A thread's two tiles (scores or probabilities; dP then dS).
struct Tiles {
  float* probs;
  float* ds;
};

Tiles thread_tiles(float* scratch, const AttentionShape& s) {
  const int64_t tile = attention_block_rows(s) * s.seq_len;
  float* base = scratch + static_cast<int64_t>(omp_get_thread_num()) * 2 * tile;
  return Tiles{base, base + tile};
}

// The inputs of one pass, shared by every head.
struct Operands {
  const float *q, *k, *v;
  AttentionShape s;
  float scale;
};

// out and lse of query head h of sequence b, block by block.
void forward_head(float* out, float* lse, float* tile, const int32_t* first, const Operands& x,
                  int64_t b, int64_t h) {
  const AttentionShape& s = x.s;
  const HeadView view = head_view(s, b, h);
  const int64_t block_rows = attention_block_rows(s);
  for (int64_t i0 = 0; i0 < s.seq_len; i0 += block_rows) {
    const Block block = block_at(s, first, i0, block_rows);
    const int64_t q_rows = view.q_row(i0);
    const int64_t kv_rows = view.kv_row(block.key_begin);
    gemm(false, true, block.queries, block.keys, s.head_dim, x.scale, x.q + q_rows, view.q_stride,
         x.k + kv_rows, view.kv_stride, 0.0f, tile, block.keys);
    softmax_rows(tile, lse, first, block, s.sliding_window);
    gemm(false, false, block.queries, s.head_dim, block.keys, 1.0f, tile, block.keys, x.v + kv_rows,
         view.kv_stride, 0.0f, out + q_rows, view.q_stride);
  }
}

// Gradients of one query head h of sequence b: dq overwritten, dk and dv accumulated.
void backward_head(float* dq, float* dk, float* dv, Tiles tiles, const float* dout,
                   const float* lse, const int32_t* first, const Operands& x, int64_t b,
                   int64_t h) {
  const AttentionShape& s = x.s;
  const HeadView view = head_view(s, b, h);
  const int64_t block_rows = attention_block_rows(s);
  for (int64_t i0 = 0; i0 < s.seq_len; i0 += block_rows) {
    const Block block = block_at(s, first, i0, block_rows);
    const int64_t q_rows = view.q_row(i0);
    const int64_t kv_rows = view.kv_row(block.key_begin);
    // S = scale·Q·Kᵀ and dP = dO·Vᵀ; then P from the saved log-sum-exps and dS.
    gemm(false, true, block.queries, block.keys, s.head_dim, x.scale, x.q + q_rows, view.q_stride,
         x.k + kv_rows, view.kv_stride, 0.0f, tiles.probs, block.keys);
    gemm(false, true, block.queries, block.keys, s.head_dim, 1.0f, dout + q_rows, view.q_stride,
         x.v + kv_rows, view.kv_stride, 0.0f, tiles.ds, block.keys);
    softmax_backward_rows(tiles.probs, tiles.ds, lse, first, block, s.sliding_window);
    // dv += Pᵀ·dO; dq = scale·dS·K; dk += scale·dSᵀ·Q.
    gemm(true, false, block.keys, s.head_dim, block.queries, 1.0f, tiles.probs, block.keys,
         dout + q_rows, view.q_stride, 1.0f, dv + kv_rows, view.kv_stride);
    gemm(false, false, block.queries, s.head_dim, block.keys, x.scale, tiles.ds, block.keys,
         x.k + kv_rows, view.kv_stride, 0.0f, dq + q_rows, view.q_stride);
    gemm(true, false, block.keys, s.head_dim, block.queries, x.scale, tiles.ds, block.keys,
         x.q + q_rows, view.q_stride, 1.0f, dk + kv_rows, view.kv_stride);
  }
}

// Zeroes kv head kv_head's columns of sequence b's rows of x [batch·T, num_kv_heads·head_dim].
void zero_kv_head(float* x, const AttentionShape& s, int64_t b, int64_t kv_head) {
  const int64_t stride = s.num_kv_heads * s.head_dim;
  for (int64_t t = 0; t < s.seq_len; ++t) {
    std::fill_n(x + (b * s.seq_len + t) * stride + kv_head * s.head_dim, s.head_dim, 0.0f);
  }
}

}  // namespace

int64_t attention_block_rows(const AttentionShape& s) {
  return std::max<int64_t>(1, std::min(kBlock, s.seq_len));
}

int64_t attention_saved_floats(const AttentionShape& s) {
  return s.batch * s.num_heads * s.seq_len + s.batch * s.seq_len;
}

int64_t attention_scratch_floats(const AttentionShape& s) {
  return static_cast<int64_t>(omp_get_max_threads()) * 2 * attention_block_rows(s) * s.seq_len;
}

void attention_forward(float* out, float* saved, float* scratch, const float* q, const float* k,
                       const float* v, const int32_t* first_key, const AttentionShape& s) {
  if (empty(s)) return;
  int32_t* first = saved_first_keys(saved, s);
  for (int64_t i = 0; i < s.batch * s.seq_len; ++i)
    first[i] = first_key == nullptr ? 0 : first_key[i];
  const Operands x{q, k, v, s, 1.0f / std::sqrt(static_cast<float>(s.head_dim))};
  // One (sequence, head) per iteration; the GEMM library runs single-threaded inside the region.
#pragma omp parallel for schedule(dynamic)
  for (int64_t bh = 0; bh < s.batch * s.num_heads; ++bh) {
    const int64_t b = bh / s.num_heads, h = bh % s.num_heads;
    forward_head(out, saved + bh * s.seq_len, thread_tiles(scratch, s).probs, first + b * s.seq_len,
                 x, b, h);
  }
}

void attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                        const float* saved, const float* q, const float* k, const float* v,
                        const AttentionShape& s) {
  if (empty(s)) return;
  const int64_t group = s.num_heads / s.num_kv_heads;
  const int32_t* first = saved_first_keys(saved, s);
  const Operands x{q, k, v, s, 1.0f / std::sqrt(static_cast<float>(s.head_dim))};
  // Parallel over (sequence, kv head): the query heads of a group accumulate into the same dk/dv,
  // so they run in order inside one iteration and no two threads write the same rows (no atomics;
  // the same bits on every run).
#pragma omp parallel for schedule(dynamic)
  for (int64_t bg = 0; bg < s.batch * s.num_kv_heads; ++bg) {
    const int64_t b = bg / s.num_kv_heads, kv_head = bg % s.num_kv_heads;
    zero_kv_head(dk, s, b, kv_head);
    zero_kv_head(dv, s, b, kv_head);
    const Tiles tiles = thread_tiles(scratch, s);
    for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
      backward_head(dq, dk, dv, tiles, dout, saved + (b * s.num_heads + h) * s.seq_len,
                    first + b * s.seq_len, x, b, h);
    }
  }
}

}  // namespace lomo::cpu
