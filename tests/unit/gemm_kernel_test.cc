// The CPU GEMM library's kernel choice against what cpuid says the processor has, and the bf16
// matmul mode against the fp32 path: single products, the tiny model's loss and gradients, and a
// LOMO training curve.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/gemm_dispatch.h"
#include "tests/unit/tiny_model.h"
#include "worker/engine/llama_model.h"
#include "worker/optim/optimizer.h"

namespace lomo {
namespace {

using Precision = Backend::MatmulPrecision;

// Sets the shared CPU backend's matmul precision for one scope; fp32 again afterwards, so no other
// test in this process inherits bf16.
class PrecisionScope {
 public:
  explicit PrecisionScope(Precision p) { cpu().set_matmul_precision(p); }
  ~PrecisionScope() { cpu().set_matmul_precision(Precision::kFp32); }
  static Backend& cpu() { return backend_for(Device::cpu()); }
};

std::vector<float> random_values(size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(count);
  for (float& x : v) x = normal(rng);
  return v;
}

TEST(GemmKernel, IsNotGenericOnACpuWithAvx2OrAvx512) {
  const cpu::CpuFeatures f = cpu::cpu_features();
  const cpu::GemmKernel k = cpu::gemm_kernel();
  std::printf("cpu avx2 %d avx512f %d avx512_bf16 %d amx_bf16 %d; %s chose %s\n", f.avx2, f.avx512f,
              f.avx512_bf16, f.amx_bf16, k.library.c_str(), k.isa.c_str());
  if (f.avx2 || f.avx512f) {
    EXPECT_FALSE(k.generic) << k.library << " chose " << k.isa;
  }
  if (f.avx512f) {
    EXPECT_NE(k.isa.find("avx512"), std::string::npos) << k.isa;
  }
}

TEST(GemmKernel, Bf16IsAvailableExactlyWhenTheCpuHasBf16Instructions) {
  const cpu::CpuFeatures f = cpu::cpu_features();
  EXPECT_EQ(cpu::bf16_matmul_supported(), f.avx512_bf16 || f.amx_bf16);
  if (cpu::bf16_matmul_supported()) {
    // A native kernel, not oneDNN's reference loops.
    const std::string impl = cpu::bf16_matmul_implementation(256, 512, 512);
    EXPECT_EQ(impl.find("ref"), std::string::npos) << impl;
  }
}

TEST(Bf16Matmul, IsRefusedWithAClearErrorWhereTheCpuLacksIt) {
  bool threw = false;
  try {
    PrecisionScope scope(Precision::kBf16);
  } catch (const std::runtime_error& e) {
    threw = true;
    EXPECT_NE(std::string(e.what()).find("AVX512-BF16"), std::string::npos) << e.what();
  }
  EXPECT_EQ(threw, !cpu::bf16_matmul_supported());
}

// Each product of the linear layer in bf16 mode: within the bf16 input rounding bound of the exact
// result (each input relative 2^-9, so each term 2^-8, plus fp32 accumulation), and not the fp32
// result (the mode really rounds).
TEST(Bf16Matmul, LinearLayerProductsStayWithinTheBf16RoundingBound) {
  if (!cpu::bf16_matmul_supported()) GTEST_SKIP() << "CPU without AVX512-BF16/AMX";
  const int64_t m = 37, n = 70, k = 129;
  const auto x = random_values(m * k, 1), w = random_values(n * k, 2), dy = random_values(m * n, 3);
  std::vector<float> y(m * n, 1.0f), dx(m * k, 1.0f), dw(n * k, 1.0f);
  {
    PrecisionScope scope(Precision::kBf16);
    Backend& b = PrecisionScope::cpu();
    b.matmul_forward(y.data(), x.data(), w.data(), m, n, k, /*accumulate=*/true);
    b.matmul_backward_input(dx.data(), dy.data(), w.data(), m, n, k, false);
    b.matmul_backward_weight(dw.data(), dy.data(), x.data(), m, n, k, false);
  }
  // Checks out = init + Σ_t a(t)·b(t) against float64, bounded by 2^-7·Σ|a·b|.
  auto check = [](const char* what, float got, double init, int64_t terms, auto term) {
    double exact = init, magnitude = 0.0;
    for (int64_t t = 0; t < terms; ++t) {
      exact += term(t);
      magnitude += std::abs(term(t));
    }
    EXPECT_NEAR(got, exact, std::ldexp(magnitude, -7) + 1e-6) << what;
    return std::abs(got - exact) / magnitude;
  };
  double largest = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      largest = std::max(largest, check("y", y[i * n + j], 1.0, k, [&](int64_t t) {
                           return double(x[i * k + t]) * w[j * k + t];
                         }));
    }
    for (int64_t j = 0; j < k; ++j) {
      check("dx", dx[i * k + j], 0.0, n,
            [&](int64_t t) { return double(dy[i * n + t]) * w[t * k + j]; });
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      check("dw", dw[i * k + j], 0.0, m,
            [&](int64_t t) { return double(dy[t * n + i]) * x[t * k + j]; });
    }
  }
  // fp32 would be ~1e-7 relative; bf16 inputs leave errors near 2^-9.
  EXPECT_GT(largest, 1e-5) << "the bf16 mode computed in fp32";
}

class FullGradient : public GradientSink {
 public:
  void consume(Parameter& p, const TensorView& g) override {
    grads[p.name].assign(g.f32(), g.f32() + p.numel());
  }
  std::map<std::string, std::vector<float>> grads;
};

TokenBatch batch_for_step(int step) {
  TokenBatch b;
  b.batch_size = 2;
  b.seq_len = 12;
  for (int i = 0; i < 24; ++i) {
    b.input_ids.push_back((i * 7 + step * 3) % 17);
    b.targets.push_back((i * 5 + step + i / 3) % 17);
  }
  return b;
}

// Loss and every gradient of the tiny model: bf16 matmuls within 1e-2 relative of fp32 for the
// loss and 3e-2 relative (L2, per tensor) for each gradient.
TEST(Bf16Matmul, TinyModelLossAndGradientsMatchFp32WithinBf16Tolerance) {
  if (!cpu::bf16_matmul_supported()) GTEST_SKIP() << "CPU without AVX512-BF16/AMX";
  TinyReplica replica;
  FullGradient fp32, bf16;
  const double loss32 = replica.model.forward(batch_for_step(1)).loss;
  replica.model.backward(fp32);
  double loss16 = 0.0;
  {
    PrecisionScope scope(Precision::kBf16);
    loss16 = replica.model.forward(batch_for_step(1)).loss;
    replica.model.backward(bf16);
  }
  EXPECT_NEAR(loss16, loss32, 1e-2 * loss32);
  EXPECT_NE(loss16, loss32) << "the bf16 mode computed in fp32";
  ASSERT_EQ(bf16.grads.size(), fp32.grads.size());
  for (const auto& [name, g32] : fp32.grads) {
    const std::vector<float>& g16 = bf16.grads.at(name);
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < g32.size(); ++i) {
      diff += (double(g16[i]) - g32[i]) * (double(g16[i]) - g32[i]);
      norm += double(g32[i]) * g32[i];
    }
    EXPECT_LE(std::sqrt(diff), 3e-2 * std::sqrt(norm)) << name;
  }
}

// 40 LOMO steps on bf16 weights with stochastic rounding (the update itself stays fp32): the loss
// curve with bf16 matmuls follows the fp32 curve (bounds below), and both learn.
TEST(Bf16Matmul, TinyModelLomoTrainingCurveMatchesFp32) {
  if (!cpu::bf16_matmul_supported()) GTEST_SKIP() << "CPU without AVX512-BF16/AMX";
  auto curve = [](Precision precision) {
    TinyReplica replica(DType::kBF16);
    OptimizerOptions options;
    options.kind = OptimizerOptions::Kind::kLomo;
    options.stochastic_rounding = true;
    options.seed = 7;
    auto optimizer = make_optimizer(options, replica.weights, replica.accountant, nullptr);
    PrecisionScope scope(precision);
    std::vector<double> losses;
    for (int step = 1; step <= 40; ++step) {
      losses.push_back(replica.model.forward(batch_for_step(step % 4)).loss);
      optimizer->step(replica.model, step, 0.05);
    }
    return losses;
  };
  const std::vector<double> fp32 = curve(Precision::kFp32), bf16 = curve(Precision::kBf16);
  // Stochastic rounding makes single steps noisy (a few % on a model this small, seed to seed):
  // each step within 5%, and the mean over each pass through the four batches within 2%.
  for (size_t i = 0; i < fp32.size(); ++i) {
    EXPECT_NEAR(bf16[i], fp32[i], 5e-2 * fp32[i]) << "step " << i + 1;
  }
  for (size_t pass = 0; pass < fp32.size() / 4; ++pass) {
    double mean32 = 0.0, mean16 = 0.0;
    for (size_t i = pass * 4; i < pass * 4 + 4; ++i) {
      mean32 += fp32[i] / 4;
      mean16 += bf16[i] / 4;
    }
    EXPECT_NEAR(mean16, mean32, 2e-2 * mean32) << "pass " << pass + 1;
  }
  EXPECT_LT(fp32.back(), 0.8 * fp32.front());
  EXPECT_LT(bf16.back(), 0.8 * bf16.front());
}

}  // namespace
}  // namespace lomo
