// The parameters of a LLaMA model: one accountable buffer per Hugging Face tensor, in storage
// dtype.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "worker/engine/llama_config.h"
#include "worker/engine/memory.h"

namespace lomo {

struct Parameter {
  std::string name;  // Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;
  DType dtype = DType::kF32;
  Buffer storage;
  // Norm weights are the vectors that weight decay conventionally skips.
  bool is_norm_weight = false;

  int64_t numel() const;
  size_t size_bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  std::string shape_string() const;  // "[4096, 4096]"
};

// Pointers into LlamaWeights for one decoder layer; valid as long as the weights live.
struct LlamaLayerWeights {
  Parameter* input_norm;
  Parameter* q_proj;  // [heads*head_dim, hidden]
  Parameter* k_proj;  // [kv_heads*head_dim, hidden]
  Parameter* v_proj;  // [kv_heads*head_dim, hidden]
  Parameter* o_proj;  // [hidden, heads*head_dim]
  Parameter* post_attention_norm;
  Parameter* gate_proj;  // [intermediate, hidden]
  Parameter* up_proj;    // [intermediate, hidden]
  Parameter* down_proj;  // [hidden, intermediate]
};

class LlamaWeights {
 public:
  // Allocates every parameter (contents uninitialised) in `storage` dtype. Validates the config.
  LlamaWeights(const LlamaConfig& config, DType storage, MemoryAccountant& accountant);
  LlamaWeights(LlamaWeights&&) = default;
  LlamaWeights(const LlamaWeights&) = delete;
  LlamaWeights& operator=(const LlamaWeights&) = delete;

  const LlamaConfig& config() const { return config_; }
  DType storage_dtype() const { return storage_dtype_; }
  // Hugging Face order: embeddings, layers in order, final norm, lm_head (absent when tied).
  std::vector<Parameter>& parameters() { return parameters_; }
  const std::vector<Parameter>& parameters() const { return parameters_; }
  Parameter* find(const std::string& name);

  Parameter& embed_tokens() { return parameters_[0]; }
  Parameter& final_norm() { return parameters_[final_norm_index_]; }
  // The LM head: its own tensor, or embed_tokens when the embeddings are tied.
  Parameter& lm_head();
  LlamaLayerWeights layer(int64_t index);

  int64_t parameter_count() const;
  // The largest single tensor's element count: the LOMO step's gradient buffer size.
  int64_t largest_parameter_numel() const;

  // Deterministic initialisation: matrices ~ N(0, stddev^2), norm weights = 1 (the same values on
  // every device: they are drawn on the host and copied).
  void init_random(uint64_t seed, float stddev);
  // Copies every parameter's values from `source`, which must have the same config and storage
  // dtype and may live on another device (host ↔ GPU): how weights read on the host reach a GPU and
  // come back to be saved. Throws std::invalid_argument when the two do not match.
  void copy_values_from(const LlamaWeights& source);

 private:
  LlamaConfig config_;
  DType storage_dtype_;
  std::vector<Parameter> parameters_;
  size_t final_norm_index_ = 0;
};

}  // namespace lomo
