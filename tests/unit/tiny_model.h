// The tiny Llama the optimizer-level tests train (optimizer_test, data_parallel_test): its config,
// one replica (accountant, weights, model) and a float copy of its weights for comparisons.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "worker/engine/llama_model.h"
#include "worker/engine/memory.h"

namespace lomo {

// Two layers, grouped-query attention (4 heads over 2 key/value heads), a 17-token vocabulary:
// every code path of a real model, small enough for exact references and many steps per test.
inline LlamaConfig tiny_config() {
  LlamaConfig c;
  c.vocab_size = 17;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.max_position_embeddings = 32;
  return c;
}

// One replica of the tiny model with random weights; the same seed gives identical replicas.
struct TinyReplica {
  explicit TinyReplica(DType dtype = DType::kF32, uint64_t seed = 5)
      : weights(tiny_config(), dtype, accountant), model(weights, accountant) {
    weights.init_random(seed, 0.3f);
  }
  MemoryAccountant accountant;
  LlamaWeights weights;
  LlamaModel model;
};

// Every parameter's values as floats, by name.
inline std::map<std::string, std::vector<float>> snapshot(const LlamaWeights& w) {
  std::map<std::string, std::vector<float>> s;
  for (const Parameter& p : w.parameters()) {
    std::vector<float> v(static_cast<size_t>(p.numel()));
    convert_to_float(p.dtype, p.storage.data(), v.data(), v.size());
    s[p.name] = std::move(v);
  }
  return s;
}

}  // namespace lomo
