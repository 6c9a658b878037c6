#include "worker/engine/llama_weights.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

#include "kernels/backend.h"
#include "kernels/counter_hash.h"

namespace lomo {
namespace {

double unit_uniform(uint64_t bits) { return (static_cast<double>(bits >> 11) + 0.5) * 0x1.0p-53; }

}  // namespace

int64_t Parameter::numel() const {
  int64_t count = 1;
  for (int64_t extent : shape) count *= extent;
  return count;
}

std::string Parameter::shape_string() const {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

LlamaWeights::LlamaWeights(const LlamaConfig& config, DType storage, MemoryAccountant& accountant)
    : config_(config), storage_dtype_(storage) {
  config_.validate();
  const int64_t hidden = config.hidden_size;
  const int64_t q_width = config.num_attention_heads * config.head_dim;
  const int64_t kv_width = config.num_key_value_heads * config.head_dim;
  enum class Kind { kMatrix, kNorm, kBias };
  auto add = [&](std::string name, std::vector<int64_t> shape, Kind kind = Kind::kMatrix) {
    Parameter p;
    p.name = std::move(name);
    p.shape = std::move(shape);
    p.dtype = storage;
    p.is_norm_weight = kind == Kind::kNorm;
    p.is_bias = kind == Kind::kBias;
    p.storage = Buffer(accountant, MemoryKind::kParameters, p.size_bytes());
    parameters_.push_back(std::move(p));
    return parameters_.size() - 1;
  };
  // A projection's weight, then its bias when the config gives it one (Hugging Face's order).
  auto add_projection = [&](const std::string& name, int64_t out, int64_t in, bool bias,
                            size_t& weight_index, size_t& bias_index) {
    weight_index = add(name + ".weight", {out, in});
    if (bias) bias_index = add(name + ".bias", {out}, Kind::kBias);
  };
  add("model.embed_tokens.weight", {config.vocab_size, hidden});
  const int64_t inter = config.intermediate_size;
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    const std::string prefix = "model.layers." + std::to_string(i) + ".";
    LayerIndices l{};
    l.input_norm = add(prefix + "input_layernorm.weight", {hidden}, Kind::kNorm);
    const std::string attn = prefix + "self_attn.";
    add_projection(attn + "q_proj", q_width, hidden, config.qkv_bias, l.q_proj, l.q_bias);
    add_projection(attn + "k_proj", kv_width, hidden, config.qkv_bias, l.k_proj, l.k_bias);
    add_projection(attn + "v_proj", kv_width, hidden, config.qkv_bias, l.v_proj, l.v_bias);
    add_projection(attn + "o_proj", hidden, q_width, config.o_proj_bias, l.o_proj, l.o_bias);
    l.post_attention_norm = add(prefix + "post_attention_layernorm.weight", {hidden}, Kind::kNorm);
    const std::string mlp = prefix + "mlp.";
    add_projection(mlp + "gate_proj", inter, hidden, config.mlp_bias, l.gate_proj, l.gate_bias);
    add_projection(mlp + "up_proj", inter, hidden, config.mlp_bias, l.up_proj, l.up_bias);
    add_projection(mlp + "down_proj", hidden, inter, config.mlp_bias, l.down_proj, l.down_bias);
    layers_.push_back(l);
  }
  final_norm_index_ = add("model.norm.weight", {hidden}, Kind::kNorm);
  if (!config.tie_word_embeddings) add("lm_head.weight", {config.vocab_size, hidden});
}

Parameter* LlamaWeights::find(const std::string& name) {
  for (Parameter& p : parameters_) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

Parameter& LlamaWeights::lm_head() {
  return config_.tie_word_embeddings ? parameters_[0] : parameters_.back();
}

LlamaLayerWeights LlamaWeights::layer(int64_t index) {
  if (index < 0 || index >= config_.num_hidden_layers) {
    throw std::out_of_range("layer index " + std::to_string(index) + " out of range");
  }
  const LayerIndices& l = layers_[static_cast<size_t>(index)];
  auto at = [this](size_t i) { return i == kNone ? nullptr : &parameters_[i]; };
  return LlamaLayerWeights{at(l.input_norm), at(l.q_proj),    at(l.k_proj),
                           at(l.v_proj),     at(l.o_proj),    at(l.post_attention_norm),
                           at(l.gate_proj),  at(l.up_proj),   at(l.down_proj),
                           at(l.q_bias),     at(l.k_bias),    at(l.v_bias),
                           at(l.o_bias),     at(l.gate_bias), at(l.up_bias),
                           at(l.down_bias)};
}

int64_t LlamaWeights::parameter_count() const {
  int64_t total = 0;
  for (const Parameter& p : parameters_) total += p.numel();
  return total;
}

int64_t LlamaWeights::largest_parameter_numel() const {
  int64_t largest = 0;
  for (const Parameter& p : parameters_) largest = std::max(largest, p.numel());
  return largest;
}

void LlamaWeights::init_random(uint64_t seed, float stddev) {
  for (size_t t = 0; t < parameters_.size(); ++t) {
    Parameter& p = parameters_[t];
    const int64_t count = p.numel();
    std::vector<float> values(static_cast<size_t>(count));
    const uint64_t stream = mix_bits(seed ^ mix_bits(t + 1));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) {
      if (p.is_norm_weight || p.is_bias) {
        values[static_cast<size_t>(i)] = p.is_norm_weight ? 1.0f : 0.0f;
        continue;
      }
      // Box-Muller on two hashed uniforms.
      const uint64_t r = mix_bits(stream + 2 * static_cast<uint64_t>(i));
      const double u1 = unit_uniform(r), u2 = unit_uniform(mix_bits(r));
      const double normal = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
      values[static_cast<size_t>(i)] = static_cast<float>(normal * stddev);
    }
    if (p.storage.device().is_cpu()) {
      convert_from_float(p.dtype, values.data(), p.storage.data(), values.size());
    } else {
      std::vector<char> stored(p.size_bytes());
      convert_from_float(p.dtype, values.data(), stored.data(), values.size());
      backend_for(p.storage.device())
          .copy_from_host(p.storage.data(), stored.data(), stored.size());
    }
  }
}

void LlamaWeights::copy_values_from(const LlamaWeights& source) {
  if (source.parameters_.size() != parameters_.size() || source.storage_dtype_ != storage_dtype_) {
    throw std::invalid_argument(
        "LlamaWeights::copy_values_from: the weights differ in " +
        std::string(source.storage_dtype_ != storage_dtype_ ? "storage dtype" : "parameter count"));
  }
  for (size_t t = 0; t < parameters_.size(); ++t) {
    Parameter& to = parameters_[t];
    const Parameter& from = source.parameters_[t];
    if (from.name != to.name || from.shape != to.shape) {
      throw std::invalid_argument("LlamaWeights::copy_values_from: " + from.name + " " +
                                  from.shape_string() + " does not match " + to.name + " " +
                                  to.shape_string());
    }
    const Device from_device = from.storage.device(), to_device = to.storage.device();
    if (from_device == to_device) {
      backend_for(to_device).copy(to.storage.data(), from.storage.data(), to.size_bytes());
    } else if (from_device.is_cpu()) {
      backend_for(to_device).copy_from_host(to.storage.data(), from.storage.data(),
                                            to.size_bytes());
    } else if (to_device.is_cpu()) {
      backend_for(from_device)
          .copy_to_host(to.storage.data(), from.storage.data(), to.size_bytes());
    } else {
      throw std::invalid_argument("LlamaWeights::copy_values_from: " + device_name(from_device) +
                                  " to " + device_name(to_device) + " goes through the host");
    }
  }
}

}  // namespace lomo
