// Fused and materialised optimizers against straightforward references written here.
#include "worker/optim/optimizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "kernels/counter_hash.h"
#include "tests/unit/tiny_model.h"
#include "worker/engine/llama_model.h"
#include "worker/optim/loss_scaler.h"
#include "worker/optim/lr_schedule.h"

namespace lomo {
namespace {

TokenBatch batch_for_step(int step) {
  TokenBatch b;
  b.batch_size = 2;
  b.seq_len = 6;
  for (int i = 0; i < 12; ++i) {
    b.input_ids.push_back((i * 7 + step * 3) % 17);
    b.targets.push_back(i % 5 == 4 ? -100 : (i * 5 + step) % 17);
  }
  return b;
}

std::vector<float> values_of(const Parameter& p) {
  std::vector<float> v(static_cast<size_t>(p.numel()));
  convert_to_float(p.dtype, p.storage.data(), v.data(), v.size());
  return v;
}

// Empty when equal, else the first differing parameter element (keeps failure output short).
std::string first_difference(const LlamaWeights& a, const LlamaWeights& b) {
  for (const Parameter& p : a.parameters()) {
    const auto x = values_of(p), y = values_of(*const_cast<LlamaWeights&>(b).find(p.name));
    for (size_t i = 0; i < x.size(); ++i) {
      if (std::bit_cast<uint32_t>(x[i]) != std::bit_cast<uint32_t>(y[i])) {
        return p.name + "[" + std::to_string(i) + "]: " + std::to_string(x[i]) + " vs " +
               std::to_string(y[i]);
      }
    }
  }
  return "";
}

// Empty when every weight of `w` is bit for bit what `before` recorded (NaN included), else the
// first element that changed.
std::string first_change_since(const std::map<std::string, std::vector<float>>& before,
                               LlamaWeights& w) {
  for (const auto& [name, values] : before) {
    const auto now = values_of(*w.find(name));
    for (size_t i = 0; i < now.size(); ++i) {
      if (std::bit_cast<uint32_t>(now[i]) != std::bit_cast<uint32_t>(values[i])) {
        return name + "[" + std::to_string(i) + "]";
      }
    }
  }
  return "";
}

class FullGradient : public GradientSink {
 public:
  void consume(Parameter& p, const TensorView& g) override {
    grads[p.name].assign(g.f32(), g.f32() + p.numel());
  }
  std::map<std::string, std::vector<float>> grads;
};

// Biases (Llama attention_bias + mlp_bias) are parameters like any other for the fused optimizers:
// their gradients reach LOMO and AdaLomo, and like norm weights they are exempt from weight decay
// (as Hugging Face's Trainer exempts them).
TEST(LomoOptimizer, BiasesAreUpdatedFromTheirGradientsAndExemptFromWeightDecay) {
  LlamaConfig config = tiny_config();
  config.qkv_bias = config.o_proj_bias = config.mlp_bias = true;
  const double lr = 0.05, weight_decay = 0.1;
  for (const auto kind : {OptimizerOptions::Kind::kLomo, OptimizerOptions::Kind::kAdaLomo}) {
    MemoryAccountant accountant;
    LlamaWeights weights(config, DType::kF32, accountant),
        reference(config, DType::kF32, accountant);
    weights.init_random(5, 0.3f);
    reference.init_random(5, 0.3f);
    for (LlamaWeights* w : {&weights, &reference}) {
      for (Parameter& p : w->parameters()) {
        if (!p.is_bias) continue;
        for (int64_t i = 0; i < p.numel(); ++i)
          p.storage.as<float>()[i] = 0.1f * std::cos(i + 1.0f);
      }
    }
    LlamaModel model(weights, accountant), reference_model(reference, accountant);
    OptimizerOptions options;
    options.kind = kind;
    options.weight_decay = weight_decay;
    auto optimizer = make_optimizer(options, weights, accountant, nullptr);
    FullGradient full;
    reference_model.forward(batch_for_step(1));
    reference_model.backward(full);
    model.forward(batch_for_step(1));
    optimizer->step(model, 1, lr);
    int biases = 0;
    for (Parameter& p : reference.parameters()) {
      if (!p.is_bias) continue;
      ++biases;
      EXPECT_TRUE(p.skips_weight_decay()) << p.name;
      const std::vector<float> before = values_of(p), after = values_of(*weights.find(p.name));
      EXPECT_NE(before, after) << p.name << " was not updated";
      if (kind != OptimizerOptions::Kind::kLomo) continue;
      for (int64_t i = 0; i < p.numel(); ++i) {
        const double want = before[i] - lr * full.grads[p.name][i];  // keep = 1: no decay
        ASSERT_NEAR(after[i], want, 1e-6 * (1.0 + std::abs(want))) << p.name << "[" << i << "]";
      }
    }
    EXPECT_EQ(biases, 2 * 7);  // seven projections in each of two layers
  }
}

TEST(LomoOptimizer, LomoStepEqualsSgdOnTheFullGradient) {
  TinyReplica fused, materialized, reference;
  OptimizerOptions options;
  options.kind = OptimizerOptions::Kind::kLomo;
  options.weight_decay = 0.1;
  auto lomo = make_optimizer(options, fused.weights, fused.accountant, nullptr);
  options.kind = OptimizerOptions::Kind::kSgd;
  auto sgd = make_optimizer(options, materialized.weights, materialized.accountant, nullptr);
  const double lr = 0.05;
  for (int step = 1; step <= 3; ++step) {
    fused.model.forward(batch_for_step(step));
    lomo->step(fused.model, step, lr);
    materialized.model.forward(batch_for_step(step));
    sgd->step(materialized.model, step, lr);
    // Backward reads each weight before its update, so the fused gradients are those of the full
    // backward, and the update arithmetic is shared: bit-identical to SGD on all gradients.
    EXPECT_EQ(first_difference(fused.weights, materialized.weights), "") << "step " << step;

    // And against SGD written out here: p ← p·(1 − lr·wd) − lr·g, norms exempt from decay.
    FullGradient full;
    reference.model.forward(batch_for_step(step));
    reference.model.backward(full);
    for (Parameter& p : reference.weights.parameters()) {
      float* w = p.storage.as<float>();
      const double keep = p.is_norm_weight ? 1.0 : 1.0 - lr * 0.1;
      const std::vector<float> got = values_of(*fused.weights.find(p.name));
      for (int64_t i = 0; i < p.numel(); ++i) {
        w[i] = static_cast<float>(w[i] * keep - lr * full.grads[p.name][i]);
        // Rounding (and contraction into fused multiply-adds) differs by an ulp or so per step;
        // 1e-6 relative covers three steps of it.
        ASSERT_NEAR(got[i], w[i], 1e-6 * (1.0 + std::abs(w[i]))) << p.name << " step " << step;
      }
      // Keep the reference on the fused trajectory so that ulp differences do not compound.
      std::memcpy(w, got.data(), got.size() * sizeof(float));
    }
  }
}

TEST(LomoOptimizer, TwoPassClippedLomoEqualsClipThenSgd) {
  TinyReplica fused, reference;
  OptimizerOptions options;
  options.kind = OptimizerOptions::Kind::kLomo;
  options.clip_grad_norm = 0.5;  // well below this model's gradient norm: clipping is active
  auto lomo = make_optimizer(options, fused.weights, fused.accountant, nullptr);
  const float lr = 0.1f;
  fused.model.forward(batch_for_step(1));
  const StepResult result = lomo->step(fused.model, 1, lr);
  EXPECT_EQ(result.backward_passes, 2);

  FullGradient full;
  reference.model.forward(batch_for_step(1));
  reference.model.backward(full);
  double norm_squared = 0.0;
  for (auto& [name, g] : full.grads)
    for (float v : g) norm_squared += double(v) * v;
  const double norm = std::sqrt(norm_squared);
  ASSERT_GT(norm, 0.5) << "the test needs a gradient norm above the clip threshold";
  EXPECT_NEAR(result.grad_norm, norm, 1e-9 * norm);  // both sum the same squares in double
  const double coefficient = 0.5 / (norm + 1e-6);
  for (Parameter& p : reference.weights.parameters()) {
    const std::vector<float> after = values_of(*fused.weights.find(p.name));
    const float* before = p.storage.as<float>();
    for (int64_t i = 0; i < p.numel(); ++i) {
      const double expected = before[i] - lr * coefficient * full.grads[p.name][i];
      // fp32 update of an fp32 weight: within a few ulps of the float64 reference.
      ASSERT_NEAR(after[i], expected, 1e-6 * (1.0 + std::abs(expected))) << p.name << " " << i;
    }
  }
}

TEST(LomoOptimizer, PeakGradientMemoryIsTheLargestTensorForLomoAndEverythingForSgd) {
  for (auto kind : {OptimizerOptions::Kind::kLomo, OptimizerOptions::Kind::kSgd}) {
    TinyReplica f;
    OptimizerOptions options;
    options.kind = kind;
    auto optimizer = make_optimizer(options, f.weights, f.accountant, nullptr);
    f.model.forward(batch_for_step(1));
    optimizer->step(f.model, 1, 0.01);
    const uint64_t peak = f.accountant.report().peak(MemoryKind::kGradients);
    const uint64_t largest = static_cast<uint64_t>(f.weights.largest_parameter_numel()) * 4;
    const uint64_t all = static_cast<uint64_t>(f.weights.parameter_count()) * 4;
    if (kind == OptimizerOptions::Kind::kLomo) {
      EXPECT_EQ(peak, largest);
    } else {
      EXPECT_EQ(peak, largest + all);  // the engine's buffer plus every materialised gradient
    }
  }
}

// AdaLomo written out directly from the paper's formulas, in double.
class ReferenceAdaLomo {
 public:
  ReferenceAdaLomo(double lr, double weight_decay) : lr_(lr), weight_decay_(weight_decay) {}
  void step(LlamaWeights& weights, const std::map<std::string, std::vector<float>>& grads) {
    ++t_;
    const double beta = 1.0 - std::pow(double(t_), -0.8);
    for (Parameter& p : weights.parameters()) {
      const std::vector<float>& g = grads.at(p.name);
      const size_t n = g.size();
      std::vector<double> u(n);
      if (p.shape.size() == 2) {
        const size_t rows = p.shape[0], cols = p.shape[1];
        auto& r = row_[p.name];
        auto& c = col_[p.name];
        r.resize(rows, 0.0);
        c.resize(cols, 0.0);
        for (size_t i = 0; i < rows; ++i) {
          double mean = 0;
          for (size_t j = 0; j < cols; ++j)
            mean += double(g[i * cols + j]) * g[i * cols + j] + 1e-30;
          r[i] = beta * r[i] + (1 - beta) * mean / cols;
        }
        for (size_t j = 0; j < cols; ++j) {
          double mean = 0;
          for (size_t i = 0; i < rows; ++i)
            mean += double(g[i * cols + j]) * g[i * cols + j] + 1e-30;
          c[j] = beta * c[j] + (1 - beta) * mean / rows;
        }
        double r_mean = 0;
        for (double x : r) r_mean += x;
        r_mean /= rows;
        for (size_t i = 0; i < rows; ++i)
          for (size_t j = 0; j < cols; ++j)
            u[i * cols + j] = g[i * cols + j] / std::sqrt(r[i] / r_mean * c[j]);
      } else {
        auto& v = full_[p.name];
        v.resize(n, 0.0);
        for (size_t i = 0; i < n; ++i) {
          v[i] = beta * v[i] + (1 - beta) * (double(g[i]) * g[i] + 1e-30);
          u[i] = g[i] / std::sqrt(v[i]);
        }
      }
      double u_square = 0, p_square = 0;
      float* w = p.storage.as<float>();
      for (size_t i = 0; i < n; ++i) {
        u_square += u[i] * u[i];
        p_square += double(w[i]) * w[i];
      }
      const double normaliser = std::max(1.0, std::sqrt(u_square / n) / 1.0);
      const double alpha = lr_ * std::max(1e-3, std::sqrt(p_square / n));
      const double keep = p.is_norm_weight ? 1.0 : 1.0 - alpha * weight_decay_;
      for (size_t i = 0; i < n; ++i)
        w[i] = static_cast<float>(w[i] * keep - alpha * u[i] / normaliser);
    }
  }

 private:
  double lr_, weight_decay_;
  int t_ = 0;
  std::map<std::string, std::vector<double>> row_, col_, full_;
};

TEST(AdaLomoOptimizer, MatchesAStraightforwardReferenceOverSeveralSteps) {
  TinyReplica fused, reference;
  OptimizerOptions options;
  options.kind = OptimizerOptions::Kind::kAdaLomo;
  options.weight_decay = 0.01;
  auto adalomo = make_optimizer(options, fused.weights, fused.accountant, nullptr);
  ReferenceAdaLomo expected(1e-2, 0.01);
  for (int step = 1; step <= 4; ++step) {
    fused.model.forward(batch_for_step(step));
    adalomo->step(fused.model, step, 1e-2);
    FullGradient full;
    reference.model.forward(batch_for_step(step));
    reference.model.backward(full);
    expected.step(reference.weights, full.grads);
    for (const Parameter& p : reference.weights.parameters()) {
      const std::vector<float> got = values_of(*fused.weights.find(p.name));
      const float* want = p.storage.as<float>();
      for (int64_t i = 0; i < p.numel(); ++i) {
        // fp32 state and update against float64: ~1e-6 relative per step; four steps and
        // weights that feed back into the gradients stay well inside 1e-4 of the weight scale.
        ASSERT_NEAR(got[i], want[i], 1e-4 * (std::abs(want[i]) + 1e-2))
            << p.name << "[" << i << "] step " << step;
      }
    }
  }
  // The factored state is counted: rows + cols per matrix, numel per vector.
  int64_t state_floats = 0;
  for (const Parameter& p : fused.weights.parameters())
    state_floats += p.shape.size() == 2 ? p.shape[0] + p.shape[1] : p.numel();
  EXPECT_EQ(fused.accountant.report().current(MemoryKind::kOptimizerState),
            static_cast<uint64_t>(state_floats) * 4);
}

TEST(AdamWOptimizer, MatchesAFloat64ReferenceOverSeveralSteps) {
  TinyReplica materialized, reference;
  OptimizerOptions options;
  options.kind = OptimizerOptions::Kind::kAdamW;
  options.weight_decay = 0.1;
  auto adamw = make_optimizer(options, materialized.weights, materialized.accountant, nullptr);
  const double lr = 1e-2;
  // PyTorch's AdamW in float64: m, v, bias corrections, decoupled decay (norm weights exempt).
  std::map<std::string, std::vector<double>> m, v;
  for (int step = 1; step <= 3; ++step) {
    materialized.model.forward(batch_for_step(step));
    adamw->step(materialized.model, step, lr);
    // The reference starts each step from the engine's weights, so the gradients are the same
    // and fp32 rounding in the weights cannot compound across steps.
    FullGradient full;
    reference.model.forward(batch_for_step(step));
    reference.model.backward(full);
    for (Parameter& p : reference.weights.parameters()) {
      const auto& g = full.grads[p.name];
      auto& mp = m[p.name];
      auto& vp = v[p.name];
      mp.resize(g.size(), 0.0);
      vp.resize(g.size(), 0.0);
      const double keep = p.is_norm_weight ? 1.0 : 1.0 - lr * options.weight_decay;
      float* w = p.storage.as<float>();
      const std::vector<float> got = values_of(*materialized.weights.find(p.name));
      for (size_t i = 0; i < g.size(); ++i) {
        mp[i] = options.beta1 * mp[i] + (1 - options.beta1) * g[i];
        vp[i] = options.beta2 * vp[i] + (1 - options.beta2) * double(g[i]) * g[i];
        const double m_hat = mp[i] / (1 - std::pow(options.beta1, step));
        const double v_hat = vp[i] / (1 - std::pow(options.beta2, step));
        const double want = w[i] * keep - lr * m_hat / (std::sqrt(v_hat) + options.eps);
        // fp32 weights (an ulp of |w| < 2 is ≤ 1.2e-7) and fp32 moments whose fp32 β₂ makes
        // 1 − β₂ off by 1.3e-5 relative: the lr-sized step is off by ≤ ~1e-5·lr = 1e-7. 1e-6
        // absolute is a few times both; a wrong rule (no bias correction, coupled decay) is off
        // by at least 1e-4.
        ASSERT_NEAR(got[i], want, 1e-6) << p.name << "[" << i << "] step " << step;
        w[i] = got[i];
      }
    }
  }
}

TEST(LossScaler, OverflowSkipsAndHalvesThenGrowsAfterTheWindow) {
  DynamicLossScaler scaler(
      {/*initial=*/1024.0, /*growth_interval=*/3, /*factor=*/2.0, /*min=*/256.0});
  EXPECT_TRUE(scaler.update(true));
  EXPECT_EQ(scaler.scale(), 512.0);
  EXPECT_TRUE(scaler.update(true));
  EXPECT_TRUE(scaler.update(true));
  EXPECT_EQ(scaler.scale(), 256.0);  // never below min
  EXPECT_FALSE(scaler.update(false));
  EXPECT_FALSE(scaler.update(false));
  EXPECT_EQ(scaler.scale(), 256.0);
  EXPECT_FALSE(scaler.update(false));
  EXPECT_EQ(scaler.scale(), 512.0);  // grows back after 3 clean steps
  EXPECT_EQ(scaler.state().clean_steps, 0);
  EXPECT_EQ(scaler.state().overflows, 3);
  DynamicLossScaler restored({1024.0, 3, 2.0, 256.0});
  restored.restore(scaler.state());
  EXPECT_EQ(restored.state(), scaler.state());
}

TEST(LossScaler, Fp16OverflowSkipsTheStepWithoutTouchingAnyWeight) {
  TinyReplica f(DType::kF16);
  OptimizerOptions options;
  options.kind = OptimizerOptions::Kind::kLomo;
  options.loss_scaling = LossScalerOptions{std::ldexp(1.0, 40), 1000, 2.0, 1.0};
  auto lomo = make_optimizer(options, f.weights, f.accountant, nullptr);
  const auto before = snapshot(f.weights);
  int skipped = 0;
  for (int step = 1; step <= 40; ++step) {
    f.model.forward(batch_for_step(1));
    const StepResult r = lomo->step(f.model, step, 0.01);
    if (!r.skipped) break;
    ++skipped;
    EXPECT_EQ(snapshot(f.weights), before) << "a skipped step changed weights";
  }
  // 2^40 times a gradient overflows fp16 (max 65504); each skip halves the scale until it fits.
  EXPECT_GT(skipped, 10);
  EXPECT_LT(skipped, 40);
  EXPECT_NE(snapshot(f.weights), before);
}

TEST(LomoOptimizer, NonFiniteGradientWithoutScalerStopsWithTheTensorName) {
  TinyReplica f;
  // A NaN in the final norm makes every logit NaN: the first gradient backward delivers, the LM
  // head's (the embeddings are not tied here), is the first non-finite one.
  ASSERT_FALSE(f.weights.config().tie_word_embeddings);
  f.weights.final_norm().storage.as<float>()[0] = std::nanf("");
  const auto before = snapshot(f.weights);
  OptimizerOptions options;
  auto lomo = make_optimizer(options, f.weights, f.accountant, nullptr);
  f.model.forward(batch_for_step(1));
  try {
    lomo->step(f.model, 1, 0.01);
    FAIL() << "a NaN gradient was accepted";
  } catch (const NonFiniteGradientError& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite gradient in lm_head.weight;"),
              std::string::npos)
        << e.what();
  }
  // The flag is read once after backward, but the update kernels saw it on the device: no
  // parameter took a NaN step (they all come after the LM head in backward order).
  EXPECT_EQ(first_change_since(before, f.weights), "");
}

TEST(SgdOptimizer, NonFiniteGradientStopsBeforeAnyUpdateAndNamesTheFirstTensor) {
  TinyReplica f;
  f.weights.final_norm().storage.as<float>()[0] = std::nanf("");
  const auto before = snapshot(f.weights);
  OptimizerOptions options;
  options.kind = OptimizerOptions::Kind::kSgd;
  auto sgd = make_optimizer(options, f.weights, f.accountant, nullptr);
  f.model.forward(batch_for_step(1));
  try {
    sgd->step(f.model, 1, 0.01);
    FAIL() << "a NaN gradient was accepted";
  } catch (const NonFiniteGradientError& e) {
    // Materialised gradients are checked in parameter order: the embedding comes first.
    EXPECT_NE(std::string(e.what()).find("non-finite gradient in model.embed_tokens.weight;"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(first_change_since(before, f.weights), "");
}

TEST(OptimizerState, SavedAndRestoredStateContinuesBitIdentically) {
  for (auto kind : {OptimizerOptions::Kind::kAdaLomo, OptimizerOptions::Kind::kAdamW}) {
    TinyReplica a, b;
    OptimizerOptions options;
    options.kind = kind;
    auto first = make_optimizer(options, a.weights, a.accountant, nullptr);
    for (int step = 1; step <= 2; ++step) {
      a.model.forward(batch_for_step(step));
      first->step(a.model, step, 1e-2);
    }
    const auto state =
        std::filesystem::path(::testing::TempDir()) /
        ("state_" + std::to_string(::getpid()) + "_" + optimizer_kind_name(kind) + ".safetensors");
    first->save_state(state);
    // b takes a's weights and optimizer state, then both take step 3.
    for (Parameter& p : b.weights.parameters()) {
      std::memcpy(p.storage.data(), a.weights.find(p.name)->storage.data(), p.size_bytes());
    }
    auto second = make_optimizer(options, b.weights, b.accountant, nullptr);
    second->load_state(state);
    a.model.forward(batch_for_step(3));
    first->step(a.model, 3, 1e-2);
    b.model.forward(batch_for_step(3));
    second->step(b.model, 3, 1e-2);
    EXPECT_EQ(first_difference(a.weights, b.weights), "") << optimizer_kind_name(kind);
    // State of another optimizer kind is refused by name.
    OptimizerOptions other;
    other.kind = OptimizerOptions::Kind::kSgd;
    auto wrong = make_optimizer(other, b.weights, b.accountant, nullptr);
    EXPECT_THROW(wrong->load_state(state), std::runtime_error);
  }
}

TEST(StochasticRounding, RoundsUpWithProbabilityEqualToTheDiscardedFraction) {
  // 1 + 0.3 ulp (bf16 ulp at 1 is 2^-7): over many hash draws ~30% round up, the rest down.
  const float value = 1.0f + 0.3f * 0x1p-7f;
  int up = 0;
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) {
    const uint16_t bits =
        float_to_bf16_stochastic(value, mix_bits(1234 + static_cast<uint64_t>(i)));
    const float rounded = bf16_to_float(bits);
    ASSERT_TRUE(rounded == 1.0f || rounded == 1.0f + 0x1p-7f) << rounded;
    up += rounded > 1.0f;
  }
  // The discarded fraction is exactly the low 16 bits of the fp32 value over 2^16 (≈ 0.3). The
  // count of round-ups is Binomial(draws, p): within 6 standard deviations of its mean (a false
  // alarm once in 5·10^8 runs; a biased rounding, e.g. p = 0.25 or 0.5, is ≥ 15 deviations off).
  const double p = (std::bit_cast<uint32_t>(value) & 0xffffu) / 65536.0;
  EXPECT_NEAR(p, 0.3, 1e-4);
  const double mean = draws * p, sigma = std::sqrt(draws * p * (1 - p));
  EXPECT_NEAR(up, mean, 6 * sigma) << "p " << p;
  EXPECT_EQ(float_to_bf16_stochastic(-0.0f, 77), float_to_bf16(-0.0f));
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16_stochastic(INFINITY, 0xffff))));
}

TEST(StochasticRounding, Bf16UpdatesBelowHalfAnUlpAreNotAllLost) {
  TinyReplica nearest(DType::kBF16), stochastic(DType::kBF16);
  OptimizerOptions options;
  options.kind = OptimizerOptions::Kind::kLomo;
  auto plain = make_optimizer(options, nearest.weights, nearest.accountant, nullptr);
  options.stochastic_rounding = true;
  options.seed = 3;
  auto random = make_optimizer(options, stochastic.weights, stochastic.accountant, nullptr);
  const auto before = snapshot(stochastic.weights);
  const double lr = 1e-2;
  nearest.model.forward(batch_for_step(1));
  plain->step(nearest.model, 1, lr);
  stochastic.model.forward(batch_for_step(1));
  random->step(stochastic.model, 1, lr);
  // Updates below half a bf16 ulp are lost by round-to-nearest but move a fraction of the weights
  // under stochastic rounding.
  int64_t eligible = 0, changed_nearest = 0, changed_stochastic = 0;
  double expected_changes = 0.0, variance = 0.0;
  FullGradient full;
  TinyReplica probe(DType::kBF16);
  probe.model.forward(batch_for_step(1));
  probe.model.backward(full);
  for (const Parameter& p : stochastic.weights.parameters()) {
    const auto now = values_of(p), plain_now = values_of(*nearest.weights.find(p.name));
    const auto& old = before.at(p.name);
    for (size_t i = 0; i < now.size(); ++i) {
      // The fp32 value the update kernel rounds: the gradient as bf16 storage holds it, then
      // p·1 − lr·g (no weight decay). Eligible: round-to-nearest gives the old weight back (the
      // update is below half an ulp). Stochastic rounding truncates the value to `down` or
      // carries to the next bf16 away from zero with probability low16/2^16; the weight changes
      // unless the outcome is its old value.
      const float g = bf16_to_float(float_to_bf16(full.grads[p.name][i]));
      const float value = old[i] * 1.0f - static_cast<float>(lr) * g;
      if (float_to_bf16(value) != float_to_bf16(old[i]) || value == old[i]) continue;
      ++eligible;
      const uint32_t bits = std::bit_cast<uint32_t>(value);
      const double up = (bits & 0xffffu) / 65536.0;
      const uint16_t down = static_cast<uint16_t>(bits >> 16), old_bits = float_to_bf16(old[i]);
      const double change = down == old_bits ? up : down + 1 == old_bits ? 1.0 - up : 1.0;
      expected_changes += change;
      variance += change * (1.0 - change);
      changed_nearest += plain_now[i] != old[i];
      changed_stochastic += now[i] != old[i];
    }
  }
  ASSERT_GT(eligible, 100);
  EXPECT_EQ(changed_nearest, 0);
  // Each eligible weight changes independently (a counter-based hash per element) with the
  // probability above: the count is Poisson-binomial. Within 6 standard deviations of its mean;
  // an update lost (count 0) or rounded to nearest is far outside.
  EXPECT_NEAR(static_cast<double>(changed_stochastic), expected_changes, 6 * std::sqrt(variance))
      << eligible << " eligible";
  EXPECT_GT(expected_changes, 6 * std::sqrt(variance)) << "the bound must exclude a count of 0";
}

TEST(LrSchedule, WarmupThenDecay) {
  const LrSchedule linear = LrSchedule::make("linear", 1.0, 4, 0.0, 14);
  EXPECT_DOUBLE_EQ(linear.at(1), 0.2);
  EXPECT_DOUBLE_EQ(linear.at(4), 0.8);
  EXPECT_DOUBLE_EQ(linear.at(5), 1.0);
  EXPECT_DOUBLE_EQ(linear.at(10), 0.5);
  EXPECT_GT(linear.at(14), 0.0);
  const LrSchedule cosine = LrSchedule::make("cosine", 2.0, 0, 0.0, 10);
  EXPECT_DOUBLE_EQ(cosine.at(1), 2.0);
  EXPECT_NEAR(cosine.at(6), 1.0, 1e-12);
  const LrSchedule ratio = LrSchedule::make("constant", 1.0, 0, 0.1, 100);
  EXPECT_EQ(ratio.warmup_steps, 10);
  EXPECT_DOUBLE_EQ(ratio.at(50), 1.0);
  EXPECT_THROW(LrSchedule::make("step", 1.0, 0, 0.0, 10), std::invalid_argument);
}

}  // namespace
}  // namespace lomo
