// The model configuration, as Hugging Face's LlamaConfig, MistralConfig and Qwen2Config write it
// to config.json: the decoder these three share (RMSNorm, RoPE, grouped-query attention, SwiGLU),
// which differs only in projection biases and Mistral's sliding-window attention.
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

// Which transformers class a config describes; it decides the defaults of absent fields, which
// projections carry a bias, and the architecture name written back.
enum class ModelFamily { kLlama, kMistral, kQwen2 };

struct LlamaConfig {
  ModelFamily family = ModelFamily::kLlama;
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
  // Biases of the projections: q/k/v (Llama attention_bias, always in Qwen2), o_proj (Llama
  // attention_bias) and gate/up/down (Llama mlp_bias).
  bool qkv_bias = false;
  bool o_proj_bias = false;
  bool mlp_bias = false;
  // Attention window in tokens: a query attends to itself and the sliding_window − 1 keys before
  // it (transformers' `kv_idx > q_idx − sliding_window`); 0 means unlimited (plain causal).
  int64_t sliding_window = 0;
  // The config.json text this config was parsed from ("" when built in code). Saving writes it
  // back with only the fields lomo models refreshed, so keys lomo does not read (pad_token_id,
  // rope_parameters, a list of eos ids, keys of newer transformers) survive a fine-tune.
  std::string source_json;

  // Throws std::invalid_argument naming the offending field when the config cannot describe a
  // model lomo computes (non-positive sizes, heads not dividing, unsupported options).
  void validate() const;
};

// Parses config.json text. `source` names the file in error messages. Accepts LlamaForCausalLM /
// "llama", MistralForCausalLM / "mistral" and Qwen2ForCausalLM / "qwen2" (Qwen2.5 included), with
// the defaults each transformers class gives absent fields. Rejects other architectures,
// hidden_act other than silu, rope_scaling types other than llama3 and Qwen2's per-layer sliding
// window (use_sliding_window: true), with a std::invalid_argument naming source and field.
LlamaConfig parse_llama_config(std::string_view json_text, const std::string& source);
LlamaConfig load_llama_config(const std::filesystem::path& path);
// Serialises in Hugging Face's field names so that transformers' config class of the family loads
// it. A config with source_json writes that document back with the fields lomo models set from
// `config` (in the form the document uses: "dtype" or "torch_dtype", rope_parameters or
// rope_scaling, a list of eos ids kept when its first entry is eos_token_id); every other key is
// kept as it was.
std::string llama_config_to_json(const LlamaConfig& config);
// "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM".
std::string_view architecture_name(ModelFamily family);

}  // namespace lomo
