// The benchmarks' reference workload (the engine issue's config): vocab 32000, hidden 512, 8 heads
// of 64, intermediate 1376, untied head, 58M parameters at 8 layers; and a fixed random batch.
#pragma once

#include <cstdint>

#include "worker/engine/llama_model.h"

namespace lomo::bench {

inline LlamaConfig reference_config(int64_t layers = 8) {
  LlamaConfig config;
  config.vocab_size = 32000;
  config.hidden_size = 512;
  config.intermediate_size = 1376;
  config.num_hidden_layers = layers;
  config.num_attention_heads = 8;
  config.num_key_value_heads = 8;
  config.head_dim = 64;
  config.max_position_embeddings = 2048;
  config.tie_word_embeddings = false;
  return config;
}

// Uniform random tokens (a fixed LCG stream); each target is the next input, the last ignored.
inline TokenBatch random_batch(int64_t batch_size, int64_t seq_len, int64_t vocab) {
  TokenBatch batch;
  batch.batch_size = batch_size;
  batch.seq_len = seq_len;
  uint32_t state = 42;
  for (int64_t i = 0; i < batch_size * seq_len; ++i) {
    state = state * 1664525u + 1013904223u;
    batch.input_ids.push_back(static_cast<int32_t>(state % static_cast<uint32_t>(vocab)));
  }
  batch.targets.assign(batch.input_ids.begin() + 1, batch.input_ids.end());
  batch.targets.push_back(-100);
  return batch;
}

}  // namespace lomo::bench
