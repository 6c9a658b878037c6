// The chunked LM head + cross-entropy: the same loss, logits and gradients whatever the chunk size,
// backward's rescaling of the head gradients forward left, and activation memory that no longer
// holds the B·T·V logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "worker/engine/llama_model.h"

namespace lomo {
namespace {

LlamaConfig small_config(bool tied, int64_t vocab) {
  LlamaConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 16;
  c.intermediate_size = 20;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = tied;
  return c;
}

// 2 rows × 5 tokens; two targets ignored. Token ids stay below 13, the smallest vocabulary used.
TokenBatch small_batch() {
  TokenBatch batch;
  batch.batch_size = 2;
  batch.seq_len = 5;
  batch.input_ids = {1, 5, 7, 2, 12, 0, 3, 3, 9, 11};
  batch.targets = {5, 7, -100, 12, 4, 3, 3, 9, -100, 6};
  return batch;
}

class CopyingSink : public GradientSink {
 public:
  void consume(Parameter& parameter, const TensorView& view) override {
    EXPECT_EQ(gradients.count(parameter.name), 0u) << parameter.name << " delivered twice";
    gradients[parameter.name].assign(view.f32(), view.f32() + parameter.numel());
  }
  std::map<std::string, std::vector<float>> gradients;
};

// Every gradient of `actual` within `relative` of `expected`, relative to the tensor's largest
// magnitude.
void expect_gradients_near(const CopyingSink& expected, const CopyingSink& actual, double relative,
                           double factor = 1.0) {
  ASSERT_EQ(expected.gradients.size(), actual.gradients.size());
  for (const auto& [name, want] : expected.gradients) {
    const std::vector<float>& got = actual.gradients.at(name);
    double largest = 0.0;
    for (float x : want) largest = std::max(largest, std::abs(factor * x));
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_NEAR(got[i], factor * want[i], relative * largest + 1e-12) << name << " element " << i;
    }
  }
}

struct HeadRun {
  double loss = 0.0;
  std::vector<float> logits;
  CopyingSink sink;
};

HeadRun run(bool tied, int64_t chunk_rows) {
  MemoryAccountant accountant;
  LlamaWeights weights(small_config(tied, 13), DType::kF32, accountant);
  weights.init_random(11, 0.5f);
  ModelOptions options;
  options.lm_head_chunk_rows = chunk_rows;
  LlamaModel model(weights, accountant, options);
  HeadRun result;
  result.loss = model.forward(small_batch()).loss;
  result.logits.assign(model.logits(), model.logits() + 10 * 13);
  model.backward(result.sink);
  return result;
}

TEST(LmHeadChunks, LossLogitsAndGradientsDoNotDependOnTheChunkSize) {
  for (bool tied : {false, true}) {
    const HeadRun whole = run(tied, 10);  // one chunk: every row at once, as before chunking
    for (int64_t chunk : {1, 3, 4}) {
      SCOPED_TRACE("tied " + std::to_string(tied) + ", chunk " + std::to_string(chunk));
      const HeadRun chunked = run(tied, chunk);
      EXPECT_NEAR(chunked.loss, whole.loss, 1e-6 * whole.loss);
      EXPECT_EQ(chunked.logits, whole.logits);  // each row's product is the same
      expect_gradients_near(whole.sink, chunked.sink, 1e-5);
    }
  }
}

// Forward computes the head's gradients for the mean loss; a backward with another loss scale or
// token count (data parallelism, loss scaling) rescales them, and matches a backward that
// recomputes the head after evaluate().
TEST(LmHeadChunks, BackwardWithAnotherScaleMatchesRecomputingTheHead) {
  for (bool tied : {false, true}) {
    SCOPED_TRACE("tied " + std::to_string(tied));
    MemoryAccountant accountant;
    LlamaWeights weights(small_config(tied, 13), DType::kF32, accountant);
    weights.init_random(12, 0.5f);
    ModelOptions options;
    options.lm_head_chunk_rows = 3;
    LlamaModel model(weights, accountant, options);
    CopyingSink mean, fused, recomputed;
    model.forward(small_batch());
    model.backward(mean);  // 8 counted tokens, scale 1
    model.forward(small_batch());
    model.backward(fused, 2.5f, 20);
    model.evaluate(small_batch());
    model.backward(recomputed, 2.5f, 20);
    expect_gradients_near(recomputed, fused, 1e-6);
    expect_gradients_near(mean, fused, 1e-6, 2.5 * 8 / 20);
  }
}

struct Peaks {
  uint64_t activations = 0, workspace = 0;
};

Peaks forward_backward_peaks(int64_t vocab, int64_t chunk_rows) {
  MemoryAccountant accountant;
  LlamaWeights weights(small_config(false, vocab), DType::kF32, accountant);
  weights.init_random(13, 0.5f);
  ModelOptions options;
  options.lm_head_chunk_rows = chunk_rows;
  LlamaModel model(weights, accountant, options);
  CopyingSink sink;
  model.forward(small_batch());
  model.backward(sink);
  const MemoryReport report = accountant.report();
  return {report.peak(MemoryKind::kActivations), report.peak(MemoryKind::kWorkspace)};
}

// Without chunking the logits [rows, vocab] were activations: 64 more vocabulary entries would
// have added 10 rows × 64 × 4 bytes. Now the activations do not depend on the vocabulary, and the
// workspace grows by one chunk's logits only.
TEST(LmHeadChunks, PeakActivationsDoNotHoldTheLogits) {
  const Peaks small = forward_backward_peaks(16, 4);
  const Peaks large = forward_backward_peaks(16 + 64, 4);
  EXPECT_EQ(large.activations, small.activations);
  EXPECT_EQ(large.workspace - small.workspace, uint64_t{4} * 64 * 4);
}

// logits() computes the whole matrix only on request (evaluation); backward releases it.
TEST(LmHeadChunks, LogitsAreMaterialisedOnRequestAndReleasedByBackward) {
  MemoryAccountant accountant;
  LlamaWeights weights(small_config(true, 13), DType::kF32, accountant);
  weights.init_random(14, 0.5f);
  LlamaModel model(weights, accountant, {});
  model.evaluate(small_batch());
  EXPECT_EQ(accountant.report().current(MemoryKind::kGradients), 0u)
      << "evaluate() prepared backward's buffers";
  const uint64_t before = accountant.report().current(MemoryKind::kActivations);
  model.logits();
  EXPECT_EQ(accountant.report().current(MemoryKind::kActivations) - before, uint64_t{10} * 13 * 4);
  CopyingSink sink;
  model.backward(sink);
  EXPECT_EQ(accountant.report().current(MemoryKind::kActivations), before);
  EXPECT_THROW(model.logits(), std::logic_error);
}

}  // namespace
}  // namespace lomo
