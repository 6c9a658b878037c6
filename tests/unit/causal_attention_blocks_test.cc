// CPU attention runs over blocks of 64 query rows that skip the masked upper triangle (and the keys
// before every row of a block: packed samples, sliding windows) and saves only each row's
// log-sum-exp: sequences of several blocks, partial last blocks, grouped heads, packed samples and
// windows against float64 loops; saved and scratch sizes linear in the sequence length.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/attention.h"

namespace lomo {
namespace {

std::vector<float> random_values(size_t count, uint32_t seed) {
  std::mt19937 generator(seed);
  std::uniform_real_distribution<float> uniform(-1.5f, 1.5f);
  std::vector<float> values(count);
  for (float& x : values) x = uniform(generator);
  return values;
}

struct Reference {
  std::vector<double> out, dq, dk, dv;
  std::vector<double> lse;  // [batch, heads, T]
};

// Layouts as in kernels/cpu/attention.h: q [B·T, heads·d], k and v [B·T, kv_heads·d].
Reference reference(const AttentionShape& s, const std::vector<float>& q,
                    const std::vector<float>& k, const std::vector<float>& v,
                    const std::vector<float>& dout, const std::vector<int32_t>& first_key) {
  // first_key as in attention_forward, with the window applied here.
  const int64_t T = s.seq_len, d = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const int64_t qs = s.num_heads * d, ks = s.num_kv_heads * d;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Reference r{std::vector<double>(q.size()), std::vector<double>(q.size()),
              std::vector<double>(k.size()), std::vector<double>(v.size()),
              std::vector<double>(static_cast<size_t>(s.batch * s.num_heads * T))};
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.num_heads; ++h) {
      const int64_t kvh = h / group;
      auto qa = [&](int64_t t, int64_t c) { return (b * T + t) * qs + h * d + c; };
      auto ka = [&](int64_t t, int64_t c) { return (b * T + t) * ks + kvh * d + c; };
      for (int64_t i = 0; i < T; ++i) {
        int64_t start = first_key[b * T + i];
        if (s.sliding_window > 0) start = std::max(start, i - s.sliding_window + 1);
        std::vector<double> p(T, 0.0), dp(T, 0.0);
        double max_score = -1e300, sum = 0.0;
        for (int64_t j = start; j <= i; ++j) {
          for (int64_t c = 0; c < d; ++c) p[j] += double(q[qa(i, c)]) * k[ka(j, c)] * scale;
          max_score = std::max(max_score, p[j]);
        }
        for (int64_t j = start; j <= i; ++j) sum += p[j] = std::exp(p[j] - max_score);
        r.lse[(b * s.num_heads + h) * T + i] = max_score + std::log(sum);
        double dot = 0.0;
        for (int64_t j = start; j <= i; ++j) {
          p[j] /= sum;
          for (int64_t c = 0; c < d; ++c) {
            r.out[qa(i, c)] += p[j] * v[ka(j, c)];
            dp[j] += double(dout[qa(i, c)]) * v[ka(j, c)];
            r.dv[ka(j, c)] += p[j] * dout[qa(i, c)];
          }
          dot += p[j] * dp[j];
        }
        for (int64_t j = start; j <= i; ++j) {
          const double ds = p[j] * (dp[j] - dot) * scale;
          for (int64_t c = 0; c < d; ++c) {
            r.dq[qa(i, c)] += ds * k[ka(j, c)];
            r.dk[ka(j, c)] += ds * q[qa(i, c)];
          }
        }
      }
    }
  }
  return r;
}

void expect_close(const std::vector<float>& got, const std::vector<double>& want,
                  const std::string& what) {
  double largest = 0.0;
  for (double x : want) largest = std::max(largest, std::abs(x));
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 2e-5 * largest) << what << " element " << i;
  }
}

// One shape, causal and with `first_key`, against the float64 loops: out, the saved log-sum-exps
// and first keys, dq, dk, dv. Stale values in saved and scratch must not leak into the results.
void check(const AttentionShape& s, const std::vector<int32_t>& first_key, uint32_t seed) {
  const int64_t rows = s.batch * s.seq_len;
  const auto q = random_values(rows * s.num_heads * s.head_dim, seed);
  const auto k = random_values(rows * s.num_kv_heads * s.head_dim, seed + 1);
  const auto v = random_values(rows * s.num_kv_heads * s.head_dim, seed + 2);
  const auto dout = random_values(q.size(), seed + 3);
  for (bool packed : {false, true}) {
    SCOPED_TRACE(packed ? "packed samples" : "one sample per row");
    const std::vector<int32_t> firsts =
        packed ? first_key : std::vector<int32_t>(static_cast<size_t>(rows), 0);
    const Reference want = reference(s, q, k, v, dout, firsts);
    std::vector<float> out(q.size()), dq(q.size()), dk(k.size(), NAN), dv(v.size(), NAN);
    std::vector<float> saved(static_cast<size_t>(cpu::attention_saved_floats(s)), NAN);
    std::vector<float> scratch(static_cast<size_t>(cpu::attention_scratch_floats(s)), NAN);
    cpu::attention_forward(out.data(), saved.data(), scratch.data(), q.data(), k.data(), v.data(),
                           packed ? first_key.data() : nullptr, s);
    expect_close(out, want.out, "out");
    const size_t lse_count = want.lse.size();
    for (size_t i = 0; i < lse_count; ++i) {
      ASSERT_NEAR(saved[i], want.lse[i], 1e-5 * std::max(1.0, std::abs(want.lse[i])))
          << "log-sum-exp of row " << i;
    }
    const auto* saved_first = reinterpret_cast<const int32_t*>(saved.data() + lse_count);
    for (int64_t i = 0; i < rows; ++i) ASSERT_EQ(saved_first[i], firsts[i]) << "first key " << i;
    cpu::attention_backward(dq.data(), dk.data(), dv.data(), scratch.data(), dout.data(),
                            saved.data(), q.data(), k.data(), v.data(), s);
    expect_close(dq, want.dq, "dq");
    expect_close(dk, want.dk, "dk");
    expect_close(dv, want.dv, "dv");
  }
}

// Packed samples of `length` tokens in each row.
std::vector<int32_t> packed_samples(const AttentionShape& s, int64_t length) {
  std::vector<int32_t> first_key(static_cast<size_t>(s.batch * s.seq_len));
  for (size_t i = 0; i < first_key.size(); ++i) {
    first_key[i] = static_cast<int32_t>(static_cast<int64_t>(i) % s.seq_len / length * length);
  }
  return first_key;
}

TEST(CausalAttentionBlocks, SeveralBlocksMatchFloat64LoopsWithPackingAndGroupedHeads) {
  // 150 tokens: blocks of 64, 64 and 22 rows; samples of 70 start inside the second block.
  const AttentionShape s{2, 150, 4, 2, 8};
  check(s, packed_samples(s, 70), 1);
}

TEST(CausalAttentionBlocks, LongRowsWithEightQueryHeadsPerKvHeadAndAOneRowLastBlock) {
  // 257 tokens: four full blocks and one of a single row; samples of 100 let the third and later
  // blocks skip the keys before their sample.
  const AttentionShape s{1, 257, 8, 1, 16};
  check(s, packed_samples(s, 100), 11);
}

TEST(CausalAttentionBlocks, SlidingWindowsSkipTheKeysBeforeEveryRowOfABlock) {
  // Windows shorter, equal to and longer than a block, alone and with packing (samples of 90).
  for (int64_t window : {5, 64, 100}) {
    SCOPED_TRACE("window " + std::to_string(window));
    const AttentionShape s{2, 200, 4, 2, 8, window};
    check(s, packed_samples(s, 90), 20 + static_cast<uint32_t>(window));
  }
}

// The point of the blocks: no T×T matrix. Saved state is one float per row plus one int per
// token; scratch two 64-row tiles per thread, independent of batch and heads.
TEST(CausalAttentionBlocks, SavedAndScratchSizesAreLinearInTheSequenceLength) {
  const int64_t threads = omp_get_max_threads();
  for (int64_t T : {1, 7, 64, 1000, 4096}) {
    const AttentionShape s{3, T, 8, 2, 64};
    EXPECT_EQ(cpu::attention_saved_floats(s), 3 * 8 * T + 3 * T) << "T " << T;
    EXPECT_EQ(cpu::attention_scratch_floats(s), threads * 2 * std::min<int64_t>(T, 64) * T)
        << "T " << T;
  }
}

}  // namespace
}  // namespace lomo
