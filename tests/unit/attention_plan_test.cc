// The CUDA backend's chunked attention plan (kernels/cuda/attention_plan.h) executed on the host:
// the very forward/backward order and GemmArgs the GPU runs, with a reference strided-batched GEMM
// (row-major, transposes and alpha/beta as kernels/cuda/matmul.cu hands them to cuBLAS) and host
// versions of the warp-per-row kernels, against the CPU backend's attention. This is what checks
// the plan's offsets, strides and masks on a machine without a GPU; it needs no CUDA to build.
#include "kernels/cuda/attention_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"

namespace lomo {
namespace {

namespace plan = cuda::attention_plan;
using plan::Chunk;

std::vector<float> random_values(size_t count, uint32_t seed, float scale) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<float> uniform(-scale, scale);
  std::vector<float> values(count);
  for (float& x : values) x = uniform(generator);
  return values;
}

// The buffers the plan may touch; every product's operands must lie inside one of them (an
// offset or stride that strays fails here, before it reads or writes out of bounds).
class Arena {
 public:
  void add(const void* data, size_t floats) {
    const auto* begin = static_cast<const char*>(data);
    ranges_.push_back({begin, begin + floats * sizeof(float)});
  }
  // The matrix of `rows` rows of `cols` columns with leading dimension ld at `data`.
  void check(const float* data, int64_t rows, int64_t cols, int64_t ld, const char* what) const {
    if (rows == 0 || cols == 0) return;
    const auto* first = reinterpret_cast<const char*>(data);
    const auto* end = reinterpret_cast<const char*>(data + (rows - 1) * ld + cols);
    for (const Range& r : ranges_) {
      if (first >= r.begin && end <= r.end) return;
    }
    ADD_FAILURE() << what << " of " << rows << "×" << cols << " (ld " << ld
                  << ") lies outside every buffer";
    throw std::out_of_range(what);
  }

 private:
  struct Range {
    const char* begin;
    const char* end;
  };
  std::vector<Range> ranges_;
};

// Row-major C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i]; op(A) is m×k, stored k×m when transposed
// (cuBLAS sees the row-major operands as their column-major transposes, matmul.cu). Sums in
// double; beta = 0 never reads C (as cuBLAS), so NaN scratch stays harmless there.
void reference_gemm(const GemmArgs& g, const Arena& arena) {
  for (int64_t batch = 0; batch < g.batch; ++batch) {
    const float* a = g.a + batch * g.stride_a;
    const float* b = g.b + batch * g.stride_b;
    float* c = g.c + batch * g.stride_c;
    arena.check(a, g.transpose_a ? g.k : g.m, g.transpose_a ? g.m : g.k, g.lda, "A");
    arena.check(b, g.transpose_b ? g.n : g.k, g.transpose_b ? g.k : g.n, g.ldb, "B");
    arena.check(c, g.m, g.n, g.ldc, "C");
    for (int64_t i = 0; i < g.m; ++i) {
      for (int64_t j = 0; j < g.n; ++j) {
        double sum = 0.0;
        for (int64_t p = 0; p < g.k; ++p) {
          const float x = g.transpose_a ? a[p * g.lda + i] : a[i * g.lda + p];
          const float y = g.transpose_b ? b[j * g.ldb + p] : b[p * g.ldb + j];
          sum += static_cast<double>(x) * y;
        }
        float& out = c[i * g.ldc + j];
        const double result = g.alpha * sum;
        out = static_cast<float>(g.beta == 0.0f ? result : result + g.beta * double(out));
      }
    }
  }
}

// The plan's steps on the host: the row kernels of kernels/cuda/attention.cu as plain loops over
// each chunk row r = h·queries + (i − query_begin), columns jj = key − key_begin.
struct HostSteps {
  const Arena& arena;

  void gemm(const GemmArgs& args) { reference_gemm(args, arena); }
  void fill_zero(float* data, int64_t floats) { std::fill(data, data + floats, 0.0f); }

  // The attended columns [lo, hi] of query i's row, which must lie inside the chunk's keys (the
  // GPU kernels would read and write another row's columns).
  static void columns(const Chunk& c, int64_t i, int64_t sample_first_key, int64_t window,
                      int64_t* lo, int64_t* hi) {
    *lo = plan::first_attended_key(i, sample_first_key, window) - c.key_begin;
    *hi = i - c.key_begin;
    if (*lo < 0 || *lo > *hi || *hi >= c.keys) {
      ADD_FAILURE() << "query " << i << " attends columns [" << *lo << ", " << *hi
                    << "] of a chunk with " << c.keys << " keys";
      throw std::out_of_range("attended keys outside the chunk");
    }
  }

  void softmax_rows(float* scores, float* saved, const int32_t* first_key, const AttentionShape& s,
                    const Chunk& c) {
    int32_t* saved_first = plan::saved_first_keys(saved, s);
    for (int64_t r = 0; r < s.num_heads * c.queries; ++r) {
      const int64_t h = r / c.queries, i = c.query_begin + r % c.queries;
      const int64_t token = c.sequence * s.seq_len + i;
      const int32_t sample_first = first_key == nullptr ? 0 : first_key[token];
      int64_t lo = 0, hi = 0;
      columns(c, i, sample_first, s.sliding_window, &lo, &hi);
      float* row = scores + r * c.keys;
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t j = lo; j <= hi; ++j) max_score = std::max(max_score, row[j]);
      float sum = 0.0f;
      for (int64_t j = lo; j <= hi; ++j) sum += row[j] = std::exp(row[j] - max_score);
      for (int64_t j = 0; j < c.keys; ++j) row[j] = j >= lo && j <= hi ? row[j] / sum : 0.0f;
      saved[(c.sequence * s.num_heads + h) * s.seq_len + i] = max_score + std::log(sum);
      if (h == 0) saved_first[token] = sample_first;
    }
  }

  void probability_rows(float* scores, const float* saved, const AttentionShape& s,
                        const Chunk& c) {
    const int32_t* saved_first = plan::saved_first_keys(saved, s);
    for (int64_t r = 0; r < s.num_heads * c.queries; ++r) {
      const int64_t h = r / c.queries, i = c.query_begin + r % c.queries;
      int64_t lo = 0, hi = 0;
      columns(c, i, saved_first[c.sequence * s.seq_len + i], s.sliding_window, &lo, &hi);
      const float lse = saved[(c.sequence * s.num_heads + h) * s.seq_len + i];
      float* row = scores + r * c.keys;
      for (int64_t j = 0; j < c.keys; ++j)
        row[j] = j >= lo && j <= hi ? std::exp(row[j] - lse) : 0.0f;
    }
  }

  void softmax_backward_rows(float* ds, const float* probs, const AttentionShape& s,
                             const Chunk& c) {
    for (int64_t r = 0; r < s.num_heads * c.queries; ++r) {
      const float* p = probs + r * c.keys;
      float* row = ds + r * c.keys;
      float dot = 0.0f;
      for (int64_t j = 0; j < c.keys; ++j) dot += p[j] * row[j];
      for (int64_t j = 0; j < c.keys; ++j) row[j] = p[j] * (row[j] - dot);
    }
  }
};

// Largest |got − want| over the largest |want|: the measure backend_kernels_test uses.
double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double error = 0.0, scale = 1e-30;
  for (size_t i = 0; i < got.size(); ++i) {
    error = std::max(error, std::abs(double(got[i]) - want[i]));
    if (std::isnan(got[i])) error = std::numeric_limits<double>::infinity();
    scale = std::max(scale, std::abs(double(want[i])));
  }
  return error / scale;
}

// fp32 tolerance 1e-5 of the largest |value|: both sides are fp32 with sums of ≤ 200 keys or
// ≤ 33 head_dim terms; both recompute P = exp(S − lse) in backward, the plan's host rows with
// std::exp and the CPU with a 2-ulp exp over its own 64-query blocks, a few ulp apart; measured
// below ~1e-6.
constexpr double kTolerance = 1e-5;

struct Errors {
  double out = 0, dq = 0, dk = 0, dv = 0;
};

// Runs the CPU backend's attention and the plan with chunks of `chunk_rows` over the same inputs.
Errors compare_with_cpu(const AttentionShape& s, int64_t chunk_rows,
                        const std::vector<int32_t>& first_key, uint32_t seed) {
  const size_t rows = static_cast<size_t>(s.batch * s.seq_len);
  const size_t q_floats = rows * static_cast<size_t>(s.num_heads * s.head_dim);
  const size_t kv_floats = rows * static_cast<size_t>(s.num_kv_heads * s.head_dim);
  const auto q = random_values(q_floats, seed, 2.0f), k = random_values(kv_floats, seed + 1, 2.0f);
  const auto v = random_values(kv_floats, seed + 2, 1.0f);
  const auto dout = random_values(q_floats, seed + 3, 1.0f);
  const int32_t* first = first_key.empty() ? nullptr : first_key.data();

  std::vector<float> want_out(q_floats),
      cpu_saved(static_cast<size_t>(cpu::attention_saved_floats(s)));
  std::vector<float> want_dq(q_floats), want_dk(kv_floats), want_dv(kv_floats);
  std::vector<float> cpu_scratch(static_cast<size_t>(cpu::attention_scratch_floats(s)));
  cpu::attention_forward(want_out.data(), cpu_saved.data(), cpu_scratch.data(), q.data(), k.data(),
                         v.data(), first, s);
  cpu::attention_backward(want_dq.data(), want_dk.data(), want_dv.data(), cpu_scratch.data(),
                          dout.data(), cpu_saved.data(), q.data(), k.data(), v.data(), s);

  // Outputs start as NaN (the plan must write every element), scratch too (must not matter).
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(q_floats, nan), dq(q_floats, nan), dk(kv_floats, nan), dv(kv_floats, nan);
  std::vector<float> saved(static_cast<size_t>(plan::saved_floats(s)), nan);
  std::vector<float> scratch(static_cast<size_t>(plan::scratch_floats(s, chunk_rows)), nan);
  Arena arena;
  for (const std::vector<float>* x : std::initializer_list<const std::vector<float>*>{
           &q, &k, &v, &dout, &out, &dq, &dk, &dv, &scratch}) {
    arena.add(x->data(), x->size());
  }
  HostSteps steps{arena};
  plan::forward(steps, out.data(), saved.data(), scratch.data(), q.data(), k.data(), v.data(),
                first, s, chunk_rows);
  const std::vector<float> saved_after_forward = saved;
  plan::backward(steps, dq.data(), dk.data(), dv.data(), scratch.data(), dout.data(), saved.data(),
                 q.data(), k.data(), v.data(), s, chunk_rows);
  EXPECT_EQ(std::memcmp(saved.data(), saved_after_forward.data(), saved.size() * sizeof(float)), 0)
      << "backward changed saved";
  // Both backends save the same thing: log-sum-exps (as close as the outputs) and first keys.
  const size_t lse_floats = static_cast<size_t>(s.batch * s.num_heads * s.seq_len);
  EXPECT_EQ(cpu_saved.size(), saved.size()) << "saved sizes differ";
  EXPECT_LE(relative_error(std::vector<float>(saved.begin(), saved.begin() + lse_floats),
                           std::vector<float>(cpu_saved.begin(), cpu_saved.begin() + lse_floats)),
            kTolerance)
      << "log-sum-exps differ";
  EXPECT_EQ(std::memcmp(saved.data() + lse_floats, cpu_saved.data() + lse_floats,
                        (saved.size() - lse_floats) * sizeof(float)),
            0)
      << "first keys differ";
  return Errors{relative_error(out, want_out), relative_error(dq, want_dq),
                relative_error(dk, want_dk), relative_error(dv, want_dv)};
}

// Packed samples of `length` tokens in every row (first_key as the data loader writes it).
std::vector<int32_t> packed(const AttentionShape& s, int64_t length) {
  std::vector<int32_t> first(static_cast<size_t>(s.batch * s.seq_len));
  for (int64_t t = 0; t < s.batch * s.seq_len; ++t) {
    const int64_t i = t % s.seq_len, shift = t / s.seq_len;  // each row's samples start elsewhere
    first[static_cast<size_t>(t)] =
        static_cast<int32_t>(i < shift ? 0 : (i - shift) / length * length + shift);
  }
  return first;
}

TEST(AttentionPlan, ChunkedPlanMatchesTheCpuBackendOverChunksGroupsPackingAndWindows) {
  struct Case {
    int64_t seq_len, chunk_rows;
  };
  // Several chunks with a partial last one (7 = 3+3+1, 67 = 4·16+3, 200 = 3·64+8), a single
  // chunk, and the production rule's chunks (T = 200: 128 + 72).
  const Case cases[] = {{1, 1}, {7, 3}, {7, 7}, {67, 16}, {200, 64}, {200, 0}};
  const int64_t kv_heads_of_8[] = {8, 4, 2, 1};  // GQA ratios 1, 2, 4, 8
  const int64_t head_dims[] = {12, 33, 20};
  Errors worst;
  int combinations = 0;
  uint32_t seed = 1;
  for (const Case& tc : cases) {
    for (size_t variant = 0; variant < 4; ++variant) {
      const int64_t window = variant == 2 ? 5 : variant == 3 ? 40 : 0;
      const bool pack = variant == 1 || variant == 3;
      for (size_t g = 0; g < 4; ++g) {
        const AttentionShape s{2,     tc.seq_len, 8, kv_heads_of_8[g], head_dims[(g + variant) % 3],
                               window};
        const int64_t chunk_rows = tc.chunk_rows > 0 ? tc.chunk_rows : plan::chunk_rows(s);
        const std::vector<int32_t> first = pack ? packed(s, 9) : std::vector<int32_t>{};
        const std::string what =
            "T " + std::to_string(s.seq_len) + " C " + std::to_string(chunk_rows) + " H 8/" +
            std::to_string(s.num_kv_heads) + " D " + std::to_string(s.head_dim) + " window " +
            std::to_string(window) + (pack ? " packed" : "");
        const Errors e = compare_with_cpu(s, chunk_rows, first, seed += 4);
        EXPECT_LE(e.out, kTolerance) << what << " out";
        EXPECT_LE(e.dq, kTolerance) << what << " dq";
        EXPECT_LE(e.dk, kTolerance) << what << " dk";
        EXPECT_LE(e.dv, kTolerance) << what << " dv";
        worst.out = std::max(worst.out, e.out), worst.dq = std::max(worst.dq, e.dq);
        worst.dk = std::max(worst.dk, e.dk), worst.dv = std::max(worst.dv, e.dv);
        ++combinations;
      }
    }
  }
  std::printf(
      "attention plan vs CPU over %d shapes, largest relative error: out %.2e dq %.2e "
      "dk %.2e dv %.2e\n",
      combinations, worst.out, worst.dq, worst.dk, worst.dv);
}

TEST(AttentionPlan, ChunksCoverEveryQueryOnceAndStopAtTheirLastQuery) {
  const AttentionShape s{1, 67, 4, 2, 8, 20};
  int64_t next = 0;
  for (int64_t c0 = 0; c0 < s.seq_len; c0 += 16) {
    const Chunk c = plan::chunk_at(s, 0, c0, 16);
    EXPECT_EQ(c.query_begin, next);
    EXPECT_EQ(c.key_begin + c.keys, c.query_begin + c.queries) << "causal: no key after the last";
    EXPECT_EQ(c.key_begin, std::max<int64_t>(0, c0 - s.sliding_window + 1));
    next = c.query_begin + c.queries;
  }
  EXPECT_EQ(next, s.seq_len);
  EXPECT_EQ(plan::chunk_at(s, 0, 64, 16).queries, 3) << "a partial last chunk";
}

// The stated rule: the largest power of two ≤ min(T, 256) with 2·H·C·T ≤ 16 Mi floats, at least
// 16, T itself up to 16.
TEST(AttentionPlan, ChunkRowsFollowTheStatedRule) {
  auto rows = [](int64_t seq_len, int64_t heads) {
    return plan::chunk_rows(AttentionShape{1, seq_len, heads, heads, 64});
  };
  EXPECT_EQ(rows(1, 8), 1);
  EXPECT_EQ(rows(7, 8), 7);
  EXPECT_EQ(rows(16, 8), 16);
  EXPECT_EQ(rows(17, 8), 16);
  EXPECT_EQ(rows(200, 8), 128);
  EXPECT_EQ(rows(256, 8), 256);
  EXPECT_EQ(rows(2048, 32), 128);  // 2·32·128·2048 = 16 Mi floats exactly
  EXPECT_EQ(rows(4096, 32), 64);   // 7B at T = 4096
  EXPECT_EQ(rows(32768, 64), 16);  // over the budget even at 16: the floor wins
  for (int64_t seq_len : {17, 300, 1000, 4096, 8192}) {
    const AttentionShape s{1, seq_len, 32, 8, 128};
    const int64_t c = plan::chunk_rows(s);
    EXPECT_EQ(c & (c - 1), 0) << "a power of two";
    EXPECT_LE(plan::scratch_floats(s, c), plan::kScratchBudgetFloats + 128) << seq_len;
  }
}

}  // namespace
}  // namespace lomo
