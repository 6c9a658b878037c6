// The model configuration, as Hugging Face's LlamaConfig writes it to config.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "kernels/dtype.h"

namespace lomo {

// `rope_scaling` of type "llama3" (Llama 3.1+); kNone when config.json has none (or null).
struct RopeScaling {
  enum class Type { kNone, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct LlamaConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // defaults to num_attention_heads when absent
  int64_t head_dim = 0;             // defaults to hidden_size / num_attention_heads when absent
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;
  DType torch_dtype = DType::kF32;  // dtype the checkpoint was saved in

  // Throws std::invalid_argument naming the offending field when the config cannot describe a
  // model lomo computes (non-positive sizes, heads not dividing, unsupported options).
  void validate() const;
};

// Parses config.json text. `source` names the file in error messages. Rejects architectures other
// than LlamaForCausalLM / model_type "llama", hidden_act other than silu, attention or MLP biases,
// and rope_scaling types other than llama3, with a std::invalid_argument naming source and field.
LlamaConfig parse_llama_config(std::string_view json_text, const std::string& source);
LlamaConfig load_llama_config(const std::filesystem::path& path);
// Serialises in Hugging Face's field names so that transformers.LlamaConfig loads it.
std::string llama_config_to_json(const LlamaConfig& config);

}  // namespace lomo
