// CPU attention computes its products over blocks of 64 query (or key) rows that skip the masked
// upper triangle: sequences of several blocks, a partial last block, grouped heads and packed
// samples against float64 loops.
#include <gtest/gtest.h>

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
};

// Layouts as in kernels/cpu/attention.h: q [B·T, heads·d], k and v [B·T, kv_heads·d].
Reference reference(const AttentionShape& s, const std::vector<float>& q,
                    const std::vector<float>& k, const std::vector<float>& v,
                    const std::vector<float>& dout, const std::vector<int32_t>& first_key) {
  const int64_t T = s.seq_len, d = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const int64_t qs = s.num_heads * d, ks = s.num_kv_heads * d;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Reference r{std::vector<double>(q.size()), std::vector<double>(q.size()),
              std::vector<double>(k.size()), std::vector<double>(v.size())};
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.num_heads; ++h) {
      const int64_t kvh = h / group;
      auto qa = [&](int64_t t, int64_t c) { return (b * T + t) * qs + h * d + c; };
      auto ka = [&](int64_t t, int64_t c) { return (b * T + t) * ks + kvh * d + c; };
      for (int64_t i = 0; i < T; ++i) {
        const int64_t start = first_key[b * T + i];
        std::vector<double> p(T, 0.0), dp(T, 0.0);
        double max_score = -1e300, sum = 0.0;
        for (int64_t j = start; j <= i; ++j) {
          for (int64_t c = 0; c < d; ++c) p[j] += double(q[qa(i, c)]) * k[ka(j, c)] * scale;
          max_score = std::max(max_score, p[j]);
        }
        for (int64_t j = start; j <= i; ++j) sum += p[j] = std::exp(p[j] - max_score);
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

TEST(CausalAttentionBlocks, SeveralBlocksMatchFloat64LoopsWithPackingAndGroupedHeads) {
  // 150 tokens: blocks of 64, 64 and 22 rows.
  const AttentionShape s{2, 150, 4, 2, 8};
  const int64_t rows = s.batch * s.seq_len;
  const auto q = random_values(rows * s.num_heads * s.head_dim, 1);
  const auto k = random_values(rows * s.num_kv_heads * s.head_dim, 2);
  const auto v = random_values(rows * s.num_kv_heads * s.head_dim, 3);
  const auto dout = random_values(q.size(), 4);
  for (bool packed : {false, true}) {
    SCOPED_TRACE(packed ? "packed samples of 70 tokens" : "one sample per row");
    std::vector<int32_t> first_key(static_cast<size_t>(rows), 0);
    if (packed) {
      for (int64_t i = 0; i < rows; ++i) first_key[i] = (i % s.seq_len) / 70 * 70;
    }
    const Reference want = reference(s, q, k, v, dout, first_key);
    std::vector<float> out(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
    // Stale values in probs and scratch must not leak into the results.
    std::vector<float> probs(static_cast<size_t>(s.batch * s.num_heads * s.seq_len * s.seq_len),
                             NAN);
    std::vector<float> scratch(static_cast<size_t>(cpu::attention_backward_scratch_floats(s)), NAN);
    cpu::attention_forward(out.data(), probs.data(), q.data(), k.data(), v.data(),
                           packed ? first_key.data() : nullptr, s);
    expect_close(out, want.out, "out");
    for (int64_t i = 0; i < s.seq_len; ++i) {
      for (int64_t j = i + 1; j < s.seq_len; ++j) {
        ASSERT_EQ(probs[i * s.seq_len + j], 0.0f) << "masked probability " << i << ", " << j;
      }
    }
    cpu::attention_backward(dq.data(), dk.data(), dv.data(), scratch.data(), dout.data(),
                            probs.data(), q.data(), k.data(), v.data(), s);
    expect_close(dq, want.dq, "dq");
    expect_close(dk, want.dk, "dk");
    expect_close(dv, want.dv, "dv");
  }
}

}  // namespace
}  // namespace lomo
