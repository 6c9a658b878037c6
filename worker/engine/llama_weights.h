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
  // Norm weights and biases are the vectors that weight decay conventionally skips (Hugging Face's
  // Trainer exempts both). Norm weights start at 1, biases at 0.
  bool is_norm_weight = false;
  bool is_bias = false;

  int64_t numel() const;
  size_t size_bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  std::string shape_string() const;  // "[4096, 4096]"
  bool skips_weight_decay() const { return is_norm_weight || is_bias; }
};

// Pointers into LlamaWeights for one decoder layer; valid as long as the weights live. A bias is
// null when the config has none for that projection (each bias has the projection's output width).
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
  Parameter* q_bias = nullptr;
  Parameter* k_bias = nullptr;
  Parameter* v_bias = nullptr;
  Parameter* o_bias = nullptr;
  Parameter* gate_bias = nullptr;
  Parameter* up_bias = nullptr;
  Parameter* down_bias = nullptr;
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
  // Hugging Face order: embeddings, layers in order (each projection's bias right after its
  // weight), final norm, lm_head (absent when tied).
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

  // Deterministic initialisation: matrices ~ N(0, stddev^2), norm weights = 1, biases = 0 (the same
  // values on every device: they are drawn on the host and copied).
  void init_random(uint64_t seed, float stddev);
  // Copies every parameter's values from `source`, which must have the same config and storage
  // dtype and may live on another device (host ↔ GPU): how weights read on the host reach a GPU and
  // come back to be saved. Throws std::invalid_argument when the two do not match.
  void copy_values_from(const LlamaWeights& source);

 private:
  LlamaConfig config_;
  DType storage_dtype_;
  // Index into parameters_ of each member of a layer (biases: kNone when absent), in
  // LlamaLayerWeights order.
  static constexpr size_t kNone = static_cast<size_t>(-1);
  struct LayerIndices {
    size_t input_norm, q_proj, k_proj, v_proj, o_proj, post_attention_norm, gate_proj, up_proj,
        down_proj;
    size_t q_bias = kNone, k_bias = kNone, v_bias = kNone, o_bias = kNone, gate_bias = kNone,
           up_bias = kNone, down_bias = kNone;
  };
  std::vector<Parameter> parameters_;
  std::vector<LayerIndices> layers_;
  size_t final_norm_index_ = 0;
};

}  // namespace lomo
