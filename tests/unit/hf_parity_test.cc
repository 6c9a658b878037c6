// lomo against Hugging Face transformers itself: tiny checkpoints written by
// scripts/make_hf_fixtures.py (save_pretrained, safetensors) with the logits, loss and gradients
// that transformers + torch autograd computed for one batch (tests/data/hf/*/expected.json).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "worker/engine/checkpoint_io.h"
#include "worker/engine/llama_model.h"

namespace lomo {
namespace {

const std::filesystem::path kFixtures = std::filesystem::path(LOMO_TEST_DATA_DIR) / "hf";

nlohmann::json read_expected(const std::string& variant) {
  std::ifstream in(kFixtures / variant / "expected.json");
  return nlohmann::json::parse(in);
}

TokenBatch batch_from(const nlohmann::json& expected) {
  TokenBatch batch;
  batch.batch_size = expected["batch"];
  batch.seq_len = expected["seq"];
  for (const auto& row : expected["input_ids"])
    for (int id : row) batch.input_ids.push_back(id);
  for (const auto& row : expected["shifted_targets"])
    for (int target : row) batch.targets.push_back(target);
  return batch;
}

class GradientCapture : public GradientSink {
 public:
  void consume(Parameter& parameter, const TensorView& view) override {
    const float* gradient = view.f32();
    for (int64_t i = 0; i < parameter.numel(); ++i)
      norm_squared += double(gradient[i]) * gradient[i];
    first_values[parameter.name].assign(gradient,
                                        gradient + std::min<int64_t>(5, parameter.numel()));
  }
  double norm_squared = 0.0;
  std::map<std::string, std::vector<float>> first_values;
};

struct ParityCase {
  std::string variant;
  DType storage;
};

void PrintTo(const ParityCase& c, std::ostream* os) {
  *os << c.variant << "/" << dtype_name(c.storage);
}

class HfParityTest : public ::testing::TestWithParam<ParityCase> {};

TEST_P(HfParityTest, LogitsLossAndGradientsMatchTransformers) {
  const ParityCase c = GetParam();
  const nlohmann::json expected = read_expected(c.variant);
  MemoryAccountant accountant;
  LlamaWeights weights = load_llama_checkpoint(kFixtures / c.variant, c.storage, accountant);
  LlamaModel model(weights, accountant);
  const TokenBatch batch = batch_from(expected);

  const ForwardResult result = model.forward(batch);
  const double expected_loss = expected["loss"];
  // Both sides compute in fp32 with different summation orders: ~1e-6 relative apart.
  EXPECT_NEAR(result.loss, expected_loss, 1e-5 * std::abs(expected_loss));
  const std::vector<double> logits = expected["logits"];
  double max_logit = 0.0;
  for (double l : logits) max_logit = std::max(max_logit, std::abs(l));
  ASSERT_EQ(logits.size(),
            static_cast<size_t>(batch.batch_size * batch.seq_len * weights.config().vocab_size));
  for (size_t i = 0; i < logits.size(); ++i) {
    ASSERT_NEAR(model.logits()[i], logits[i], 1e-5 * max_logit) << "logit " << i;
  }

  GradientCapture capture;
  model.backward(capture);
  const double expected_norm_squared = expected["grad_norm_sq"];
  EXPECT_NEAR(capture.norm_squared, expected_norm_squared, 1e-4 * expected_norm_squared);
  for (const auto& [name, values] : expected["grad_samples"].items()) {
    ASSERT_EQ(capture.first_values.count(name), 1u) << name << " has no gradient in lomo";
    const std::vector<double> want = values;
    double scale = 0.0;
    for (double v : want) scale = std::max(scale, std::abs(v));
    // fp32 backward on both sides, different orders; 1e-4 of the entries' scale, as in the
    // finite-difference test.
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(capture.first_values[name][i], want[i], 1e-4 * scale + 1e-7)
          << name << "[" << i << "]";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfParityTest,
                         ::testing::Values(ParityCase{"untied_mha", DType::kF32},
                                           ParityCase{"tied_gqa_llama3", DType::kF32},
                                           ParityCase{"bf16_untied", DType::kBF16},
                                           ParityCase{"bf16_untied", DType::kF32},
                                           ParityCase{"llama_bias", DType::kF32},
                                           ParityCase{"qwen2_tied", DType::kF32},
                                           ParityCase{"mistral_window", DType::kF32}));

// The families' fixtures are what they claim to be: the config lomo parsed has the biases and the
// window that transformers built the model with (a fixture that lost them would pass the parity
// test for the wrong reason).
TEST(HfParityFixtures, FamilyFixturesCarryTheirBiasesAndWindow) {
  MemoryAccountant accountant;
  const LlamaWeights llama =
      load_llama_checkpoint(kFixtures / "llama_bias", DType::kF32, accountant);
  EXPECT_EQ(llama.config().family, ModelFamily::kLlama);
  EXPECT_TRUE(llama.config().qkv_bias && llama.config().o_proj_bias && llama.config().mlp_bias);
  const LlamaWeights qwen =
      load_llama_checkpoint(kFixtures / "qwen2_tied", DType::kF32, accountant);
  EXPECT_EQ(qwen.config().family, ModelFamily::kQwen2);
  EXPECT_TRUE(qwen.config().qkv_bias);
  EXPECT_FALSE(qwen.config().o_proj_bias || qwen.config().mlp_bias);
  const LlamaWeights mistral =
      load_llama_checkpoint(kFixtures / "mistral_window", DType::kF32, accountant);
  EXPECT_EQ(mistral.config().family, ModelFamily::kMistral);
  EXPECT_EQ(mistral.config().sliding_window, 3);
  EXPECT_LT(mistral.config().sliding_window, read_expected("mistral_window")["seq"].get<int>());
}

}  // namespace
}  // namespace lomo
