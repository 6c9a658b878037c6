// Fuzzes the config.json parser. It may reject input only with std::invalid_argument; a config it
// accepts must come back unchanged through llama_config_to_json, which is what a checkpoint save
// writes. Anything else (a crash, a sanitizer report, another exception) is a finding.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string_view>

#include "worker/engine/llama_config.h"

namespace {

bool same(const lomo::LlamaConfig& a, const lomo::LlamaConfig& b) {
  const lomo::RopeScaling& x = a.rope_scaling;
  const lomo::RopeScaling& y = b.rope_scaling;
  return a.vocab_size == b.vocab_size && a.hidden_size == b.hidden_size &&
         a.intermediate_size == b.intermediate_size && a.num_hidden_layers == b.num_hidden_layers &&
         a.num_attention_heads == b.num_attention_heads &&
         a.num_key_value_heads == b.num_key_value_heads && a.head_dim == b.head_dim &&
         a.max_position_embeddings == b.max_position_embeddings &&
         a.rms_norm_eps == b.rms_norm_eps && a.rope_theta == b.rope_theta && x.type == y.type &&
         x.factor == y.factor && x.low_freq_factor == y.low_freq_factor &&
         x.high_freq_factor == y.high_freq_factor &&
         x.original_max_position_embeddings == y.original_max_position_embeddings &&
         a.tie_word_embeddings == b.tie_word_embeddings && a.bos_token_id == b.bos_token_id &&
         a.eos_token_id == b.eos_token_id && a.torch_dtype == b.torch_dtype &&
         a.family == b.family && a.qkv_bias == b.qkv_bias && a.o_proj_bias == b.o_proj_bias &&
         a.mlp_bias == b.mlp_bias && a.sliding_window == b.sliding_window;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  lomo::LlamaConfig config;
  try {
    config = lomo::parse_llama_config(text, "fuzz-config.json");
  } catch (const std::invalid_argument&) {
    return -1;  // the documented rejection
  }
  config.validate();  // must not throw: parse promised a valid config
  const lomo::LlamaConfig again =
      lomo::parse_llama_config(lomo::llama_config_to_json(config), "round-trip.json");
  if (!same(config, again)) __builtin_trap();
  return 0;
}
