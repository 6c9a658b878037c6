// The engine's forward and backward against the float64 reference in llama_reference.h.
#include "worker/engine/llama_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "tests/unit/llama_reference.h"

namespace lomo {
namespace {

using testing::Tensor64;

struct Variant {
  std::string name;
  bool tied;
  int64_t kv_heads;
  bool checkpointing;
  bool llama3_rope;
  bool packed = false;
  // The family's projection biases and sliding window (ModelFamily::kLlama: biases on every
  // projection, as attention_bias + mlp_bias).
  ModelFamily family = ModelFamily::kLlama;
  bool biases = false;
  int64_t sliding_window = 0;
};

void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

LlamaConfig tiny_config(const Variant& v) {
  LlamaConfig c;
  c.vocab_size = 13;
  c.hidden_size = 16;
  c.intermediate_size = 20;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = v.kv_heads;
  c.head_dim = 4;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 50.0;  // small theta so the short test sequences rotate visibly
  c.tie_word_embeddings = v.tied;
  c.family = v.family;
  c.qkv_bias = v.biases;
  c.o_proj_bias = v.biases && v.family == ModelFamily::kLlama;
  c.mlp_bias = v.biases && v.family == ModelFamily::kLlama;
  c.sliding_window = v.sliding_window;
  if (v.llama3_rope) {
    c.rope_scaling.type = RopeScaling::Type::kLlama3;
    c.rope_scaling.factor = 8.0;
    c.rope_scaling.low_freq_factor = 1.0;
    c.rope_scaling.high_freq_factor = 4.0;
    c.rope_scaling.original_max_position_embeddings = 16;  // puts the 2 frequencies in 2 bands
  }
  return c;
}

TokenBatch tiny_batch(bool explicit_positions, bool packed = false) {
  TokenBatch batch;
  batch.batch_size = 2;
  batch.seq_len = 5;
  batch.input_ids = {1, 5, 7, 2, 12, 0, 3, 3, 9, 11};
  batch.targets = {5, 7, -100, 12, 4, 3, 3, 9, -100, 6};
  if (explicit_positions) batch.positions = {3, 4, 5, 6, 7, 0, 1, 2, 3, 4};
  if (packed) batch.segment_ids = {0, 0, 1, 1, 1, 4, 5, 5, 5, 6};  // 3 samples in row 2
  return batch;
}

TokenBatch tiny_batch(const Variant& v) { return tiny_batch(v.llama3_rope, v.packed); }

// Copies every gradient and records the delivery order and the gradient memory in use.
class RecordingSink : public GradientSink {
 public:
  explicit RecordingSink(MemoryAccountant& accountant) : accountant_(accountant) {}
  void consume(Parameter& parameter, const TensorView& view) override {
    EXPECT_EQ(gradients.count(parameter.name), 0u) << parameter.name << " delivered twice";
    EXPECT_EQ(view.device, accountant_.device()) << parameter.name;
    EXPECT_EQ(view.numel(), parameter.numel()) << parameter.name;
    EXPECT_TRUE(std::equal(view.shape.begin(), view.shape.end(), parameter.shape.begin(),
                           parameter.shape.end()))
        << parameter.name;
    const float* gradient = view.f32();
    gradients[parameter.name].assign(gradient, gradient + parameter.numel());
    order.push_back(parameter.name);
    peak_gradient_bytes =
        std::max(peak_gradient_bytes, accountant_.report().current(MemoryKind::kGradients));
  }
  std::map<std::string, std::vector<float>> gradients;
  std::vector<std::string> order;
  uint64_t peak_gradient_bytes = 0;

 private:
  MemoryAccountant& accountant_;
};

// init_random zeroes biases (as transformers does); visible biases make a test see whether they
// enter the forward pass. Deterministic values of about the weights' size.
void randomize_biases(LlamaWeights& weights) {
  for (Parameter& p : weights.parameters()) {
    if (!p.is_bias) continue;
    float* values = p.storage.as<float>();
    for (int64_t i = 0; i < p.numel(); ++i) values[i] = 0.4f * std::sin(1.7f * (i + 1));
  }
}

class LlamaModelTest : public ::testing::TestWithParam<Variant> {};

TEST_P(LlamaModelTest, LogitsAndLossMatchFloat64Reference) {
  const Variant v = GetParam();
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(v), DType::kF32, accountant);
  weights.init_random(7, 0.5f);
  randomize_biases(weights);
  LlamaModel model(weights, accountant, {v.checkpointing});
  const TokenBatch batch = tiny_batch(v);

  const ForwardResult result = model.forward(batch);
  Tensor64 reference_logits;
  const double reference = testing::reference_loss(
      weights.config(), testing::widen_parameters(weights), batch, &reference_logits);
  // fp32 forward against float64: ~1e-6 relative error from rounding; 1e-5 leaves margin.
  EXPECT_NEAR(result.loss, reference, 1e-5 * std::abs(reference));
  EXPECT_EQ(result.counted_tokens, 8);
  double max_logit = 0.0;
  for (double l : reference_logits) max_logit = std::max(max_logit, std::abs(l));
  for (size_t i = 0; i < reference_logits.size(); ++i) {
    ASSERT_NEAR(model.logits()[i], reference_logits[i], 1e-5 * max_logit) << "logit " << i;
  }
}

// Every element of every parameter tensor: the engine's fp32 gradient against central finite
// differences of the float64 reference loss.
TEST_P(LlamaModelTest, GradientsMatchFloat64FiniteDifferences) {
  const Variant v = GetParam();
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(v), DType::kF32, accountant);
  weights.init_random(11, 0.5f);
  randomize_biases(weights);
  LlamaModel model(weights, accountant, {v.checkpointing});
  const TokenBatch batch = tiny_batch(v);
  RecordingSink sink(accountant);
  model.forward(batch);
  model.backward(sink);

  std::map<std::string, Tensor64> parameters = testing::widen_parameters(weights);
  const double step = 1e-5;  // float64 central differences: truncation ~1e-10, rounding ~1e-11
  for (const Parameter& p : weights.parameters()) {
    ASSERT_EQ(sink.gradients.count(p.name), 1u) << p.name << " never delivered";
    const std::vector<float>& engine = sink.gradients[p.name];
    Tensor64& values = parameters[p.name];
    Tensor64 numeric(values.size());
    double scale = 0.0;
    for (size_t i = 0; i < values.size(); ++i) {
      const double saved = values[i];
      values[i] = saved + step;
      const double plus = testing::reference_loss(weights.config(), parameters, batch);
      values[i] = saved - step;
      const double minus = testing::reference_loss(weights.config(), parameters, batch);
      values[i] = saved;
      numeric[i] = (plus - minus) / (2 * step);
      scale = std::max(scale, std::abs(numeric[i]));
    }
    // fp32 gradients carry ~1e-6 relative rounding per accumulated term; against the tensor's
    // largest entry 1e-4 is far above that noise and far below any wrong-formula error.
    for (size_t i = 0; i < values.size(); ++i) {
      ASSERT_NEAR(engine[i], numeric[i], 1e-4 * scale + 1e-9) << p.name << " element " << i;
    }
  }
}

TEST_P(LlamaModelTest, EachGradientIsDeliveredOnceInReverseOrderWithOneBuffer) {
  const Variant v = GetParam();
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(v), DType::kF32, accountant);
  weights.init_random(3, 0.5f);
  randomize_biases(weights);
  LlamaModel model(weights, accountant, {v.checkpointing});
  RecordingSink sink(accountant);
  model.forward(tiny_batch(false));
  model.backward(sink);

  ASSERT_EQ(sink.order.size(), weights.parameters().size());
  EXPECT_EQ(sink.order.back(), "model.embed_tokens.weight");
  EXPECT_EQ(sink.order.front(), v.tied ? "model.norm.weight" : "lm_head.weight");
  // Layer 1's parameters all arrive before any of layer 0's.
  const auto first_layer0 = std::find_if(sink.order.begin(), sink.order.end(), [](auto& n) {
    return n.rfind("model.layers.0.", 0) == 0;
  });
  EXPECT_TRUE(std::none_of(first_layer0, sink.order.end(),
                           [](auto& n) { return n.rfind("model.layers.1.", 0) == 0; }));
  // One buffer of the largest tensor, plus the tied embedding's own while it waits for its last
  // use.
  const uint64_t largest = static_cast<uint64_t>(weights.largest_parameter_numel()) * 4;
  const uint64_t tied = v.tied ? static_cast<uint64_t>(weights.embed_tokens().numel()) * 4 : 0;
  EXPECT_EQ(sink.peak_gradient_bytes, largest + tied);
  EXPECT_EQ(accountant.report().peak(MemoryKind::kGradients), largest + tied);
}

TEST_P(LlamaModelTest, SecondBackwardOverOneForwardGivesIdenticalGradients) {
  const Variant v = GetParam();
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(v), DType::kF32, accountant);
  weights.init_random(5, 0.5f);
  randomize_biases(weights);
  LlamaModel model(weights, accountant, {v.checkpointing});
  RecordingSink first(accountant), second(accountant);
  model.forward(tiny_batch(v));
  model.backward(first);
  model.backward(second);
  EXPECT_EQ(first.gradients, second.gradients);
}

INSTANTIATE_TEST_SUITE_P(
    Variants, LlamaModelTest,
    ::testing::Values(
        Variant{"UntiedMultiHead", false, 4, false, false},
        Variant{"UntiedMultiHeadCheckpointed", false, 4, true, false},
        Variant{"TiedGroupedQuery", true, 2, false, false},
        Variant{"TiedGroupedQueryCheckpointed", true, 2, true, false},
        Variant{"MultiQueryLlama3Rope", false, 1, false, true},
        Variant{"MultiQueryLlama3RopeCheckpointed", false, 1, true, true},
        Variant{"PackedSamples", false, 2, false, false, true},
        Variant{"PackedSamplesTiedCheckpointed", true, 2, true, false, true},
        Variant{"LlamaAttentionAndMlpBiases", false, 2, false, false, false, ModelFamily::kLlama,
                true},
        Variant{"LlamaBiasesCheckpointed", false, 4, true, false, false, ModelFamily::kLlama, true},
        Variant{"Qwen2QkvBiasesTied", true, 2, false, false, false, ModelFamily::kQwen2, true},
        Variant{"Qwen2QkvBiasesPacked", false, 2, false, false, true, ModelFamily::kQwen2, true},
        Variant{"MistralSlidingWindow", false, 2, false, false, false, ModelFamily::kMistral, false,
                2},
        Variant{"MistralSlidingWindowPackedCheckpointed", false, 1, true, false, true,
                ModelFamily::kMistral, false, 2}),
    [](const ::testing::TestParamInfo<Variant>& info) { return info.param.name; });

TEST(LlamaModelCheckpointing, GradientsAreBitIdenticalWithAndWithoutCheckpointing) {
  Variant v{"", false, 2, false, false};
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(v), DType::kF32, accountant);
  weights.init_random(9, 0.5f);
  RecordingSink plain(accountant), checkpointed(accountant);
  LlamaModel model_plain(weights, accountant, {false});
  LlamaModel model_checkpointed(weights, accountant, {true});
  const double loss_plain = model_plain.forward(tiny_batch(false)).loss;
  const double loss_checkpointed = model_checkpointed.forward(tiny_batch(false)).loss;
  EXPECT_EQ(loss_plain, loss_checkpointed);
  model_plain.backward(plain);
  model_checkpointed.backward(checkpointed);
  EXPECT_EQ(plain.gradients, checkpointed.gradients);
}

// Through the model's outputs, not the mask: every logit of a packed row equals the logit of the
// same sample run on its own row.
TEST(LlamaModelPacking, PackedSamplesSeeNothingOfEachOther) {
  Variant v{"", false, 2, false, false};
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(v), DType::kF32, accountant);
  weights.init_random(21, 0.5f);
  LlamaModel model(weights, accountant);
  const std::vector<std::vector<int32_t>> samples = {{4, 8, 1}, {9, 9, 2, 6, 11}, {3, 12}};
  TokenBatch packed;
  packed.batch_size = 1;
  packed.seq_len = 10;
  for (size_t s = 0; s < samples.size(); ++s) {
    for (int32_t id : samples[s]) {
      packed.input_ids.push_back(id);
      packed.targets.push_back((id + 1) % 13);
      packed.segment_ids.push_back(static_cast<int32_t>(s));
    }
  }
  model.forward(packed);
  const std::vector<float> packed_logits(model.logits(), model.logits() + 10 * 13);
  size_t offset = 0;
  for (const auto& sample : samples) {
    TokenBatch alone;
    alone.batch_size = 1;
    alone.seq_len = static_cast<int64_t>(sample.size());
    alone.input_ids = sample;
    for (int32_t id : sample) alone.targets.push_back((id + 1) % 13);
    model.forward(alone);
    for (size_t i = 0; i < sample.size() * 13; ++i) {
      // Same arithmetic on fewer rows; BLAS blocking may differ: fp32 tolerance.
      ASSERT_NEAR(packed_logits[offset * 13 + i], model.logits()[i],
                  1e-5f * (1.0f + std::abs(model.logits()[i])))
          << "sample starting at " << offset;
    }
    offset += sample.size();
  }
}

TEST(LlamaModelPacking, SamplesMustBeContiguous) {
  Variant v{"", false, 2, false, false};
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(v), DType::kF32, accountant);
  weights.init_random(1, 0.5f);
  LlamaModel model(weights, accountant);
  TokenBatch batch = tiny_batch(false, true);
  batch.segment_ids[4] = 0;  // row 1: 0 0 1 1 0
  EXPECT_THROW(model.forward(batch), std::invalid_argument);
}

TEST(LlamaModelStorage, Bf16StorageComputesWithTheRoundedWeights) {
  Variant v{"", false, 2, false, false};
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(v), DType::kBF16, accountant);
  weights.init_random(13, 0.5f);
  LlamaModel model(weights, accountant);
  const TokenBatch batch = tiny_batch(false);
  const double loss = model.forward(batch).loss;
  // The reference reads the same bf16 values (widened exactly), so fp32 tolerance applies.
  const double reference =
      testing::reference_loss(weights.config(), testing::widen_parameters(weights), batch);
  EXPECT_NEAR(loss, reference, 1e-5 * std::abs(reference));
}

TEST(LlamaModelInput, MalformedBatchesAreRejectedWithTheReason) {
  Variant v{"", false, 2, false, false};
  MemoryAccountant accountant;
  LlamaWeights weights(tiny_config(v), DType::kF32, accountant);
  weights.init_random(1, 0.5f);
  LlamaModel model(weights, accountant);
  auto expect_rejected = [&](const TokenBatch& batch, const std::string& needle) {
    try {
      model.forward(batch);
      ADD_FAILURE() << "accepted a batch that should fail with " << needle;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  TokenBatch batch = tiny_batch(false);
  batch.input_ids[3] = 13;
  expect_rejected(batch, "input_ids[3] = 13");
  batch = tiny_batch(false);
  batch.targets[4] = -1;
  expect_rejected(batch, "targets[4] = -1");
  batch = tiny_batch(false);
  batch.targets.pop_back();
  expect_rejected(batch, "must each hold 10 entries");
  batch = tiny_batch(true);
  batch.positions[0] = 64;
  expect_rejected(batch, "positions[0] = 64");
  batch = tiny_batch(false);
  batch.batch_size = 0;
  expect_rejected(batch, "must be positive");
  RecordingSink sink(accountant);
  LlamaModel fresh(weights, accountant);
  EXPECT_THROW(fresh.backward(sink), std::logic_error);
}

}  // namespace
}  // namespace lomo
