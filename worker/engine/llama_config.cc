#include "worker/engine/llama_config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "common/read_file.h"

namespace lomo {
namespace {

using nlohmann::json;

// config.json is a few KB; anything far larger is not a config and would only cost memory.
constexpr size_t kMaxConfigBytes = 16u << 20;
// Real configs nest a few levels (rope_scaling, quantization_config); a deeper document is an
// attack on the parser's memory, not a model description.
constexpr int kMaxConfigNesting = 32;

// Cuts a value quoted from the file to a readable length without splitting a UTF-8 sequence, so
// that the message stays valid UTF-8 for whoever forwards it (JSON, protobuf strings).
std::string shortened(std::string_view text) {
  constexpr size_t kMaxQuoted = 200;
  if (text.size() <= kMaxQuoted) return std::string(text);
  size_t cut = kMaxQuoted;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xc0u) == 0x80u) --cut;
  return std::string(text.substr(0, cut)) + "...";
}

[[noreturn]] void fail_field(const std::string& source, std::string_view path,
                             std::string_view problem) {
  throw std::invalid_argument(source + ": field '" + std::string(path) +
                              "': " + std::string(problem));
}

// Reads the members of one JSON object, naming `prefix + key` and the source file in every error.
// Hugging Face writes null for "not set", so null reads as absent.
class FieldReader {
 public:
  FieldReader(const json& object, const std::string& source, std::string prefix)
      : object_(object), source_(source), prefix_(std::move(prefix)) {}

  const json* get(std::string_view key) const {
    const auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  bool has(std::string_view key) const { return get(key) != nullptr; }
  std::string path(std::string_view key) const { return prefix_ + std::string(key); }
  [[noreturn]] void fail(std::string_view key, std::string_view problem) const {
    fail_field(source_, path(key), problem);
  }

  int64_t positive_int(std::string_view key) const {
    const json* value = get(key);
    if (value == nullptr) fail(key, "missing (expected a positive integer)");
    return as_positive_int(key, *value);
  }
  int64_t positive_int_or(std::string_view key, int64_t fallback) const {
    const json* value = get(key);
    return value == nullptr ? fallback : as_positive_int(key, *value);
  }
  int64_t as_positive_int(std::string_view key, const json& value) const {
    const std::optional<int64_t> number = integer_value(value);
    if (!number || *number <= 0) fail(key, "expected a positive integer");
    return *number;
  }
  int64_t token_id_or(std::string_view key, int64_t fallback) const {
    const json* value = get(key);
    if (value == nullptr) return fallback;
    // Some configs list several end-of-sequence ids; the first is the canonical one.
    const json* first = value;
    if (value->is_array()) {
      if (value->empty()) fail(key, "expected a token id or a non-empty list of token ids");
      first = &(*value)[0];
    }
    const std::optional<int64_t> id = integer_value(*first);
    if (!id || *id < 0) fail(key, "expected a non-negative integer token id");
    return *id;
  }

  double positive_number(std::string_view key) const {
    const json* value = get(key);
    if (value == nullptr) fail(key, "missing (expected a positive number)");
    return as_positive_number(key, *value);
  }
  double positive_number_or(std::string_view key, double fallback) const {
    const json* value = get(key);
    return value == nullptr ? fallback : as_positive_number(key, *value);
  }
  double as_positive_number(std::string_view key, const json& value) const {
    if (!value.is_number()) fail(key, "expected a positive number");
    const double number = value.get<double>();
    if (!std::isfinite(number) || number <= 0.0) fail(key, "expected a positive number");
    return number;
  }

  bool bool_or(std::string_view key, bool fallback) const {
    const json* value = get(key);
    if (value == nullptr) return fallback;
    if (!value->is_boolean()) fail(key, "expected true or false");
    return value->get<bool>();
  }

  std::optional<std::string> string(std::string_view key) const {
    const json* value = get(key);
    if (value == nullptr) return std::nullopt;
    if (!value->is_string()) fail(key, "expected a string");
    return value->get<std::string>();
  }

  const json* object(std::string_view key) const {
    const json* value = get(key);
    if (value != nullptr && !value->is_object()) fail(key, "expected an object or null");
    return value;
  }

 private:
  static std::optional<int64_t> integer_value(const json& value) {
    if (value.is_number_unsigned()) {
      const uint64_t number = value.get<uint64_t>();
      if (number > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
      return static_cast<int64_t>(number);
    }
    if (value.is_number_integer()) return value.get<int64_t>();
    return std::nullopt;
  }

  const json& object_;
  const std::string& source_;
  std::string prefix_;
};

json parse_json_text(std::string_view text, const std::string& source) {
  if (text.size() > kMaxConfigBytes) {
    throw std::invalid_argument(source + ": " + std::to_string(text.size()) +
                                " bytes is too large for a model config");
  }
  struct TooDeep {};
  const json::parser_callback_t limit_depth = [](int depth, json::parse_event_t event, json&) {
    const bool opens =
        event == json::parse_event_t::object_start || event == json::parse_event_t::array_start;
    if (opens && depth >= kMaxConfigNesting) throw TooDeep{};
    return true;
  };
  try {
    return json::parse(text, limit_depth);
  } catch (const json::exception& error) {  // parse_error, or out_of_range for 1e400
    throw std::invalid_argument(source + ": invalid JSON: " + error.what());
  } catch (const TooDeep&) {
    throw std::invalid_argument(source + ": invalid JSON: nested deeper than " +
                                std::to_string(kMaxConfigNesting) + " levels");
  }
}

// Only LLaMA-architecture causal LMs are computed by lomo; anything else must be named and refused
// rather than loaded with the wrong math.
void check_architecture(const FieldReader& fields, const std::string& source) {
  bool llama = false;
  if (fields.has("architectures")) {
    const json& list = *fields.get("architectures");
    if (!list.is_array()) fields.fail("architectures", "expected a list of strings");
    std::string names;
    for (const json& name : list) {
      if (!name.is_string()) fields.fail("architectures", "expected a list of strings");
      if (names.size() < 400) {  // a hostile list could be megabytes long
        names += (names.empty() ? "" : ", ") + shortened(name.get<std::string>());
      }
      if (name == "LlamaForCausalLM") llama = true;
    }
    if (!llama) {
      fields.fail("architectures",
                  "unsupported architecture [" + names + "] (lomo loads LlamaForCausalLM)");
    }
  }
  if (const std::optional<std::string> model_type = fields.string("model_type")) {
    if (*model_type != "llama") {
      fields.fail("model_type",
                  "unsupported model type '" + shortened(*model_type) + "' (expected 'llama')");
    }
    llama = true;
  }
  if (!llama) {
    throw std::invalid_argument(source +
                                ": neither 'architectures' nor 'model_type' says this is a "
                                "LLaMA model (expected LlamaForCausalLM / 'llama')");
  }
}

void check_unsupported_options(const FieldReader& fields) {
  if (const std::optional<std::string> act = fields.string("hidden_act")) {
    if (*act != "silu") {
      fields.fail("hidden_act",
                  "unsupported activation '" + shortened(*act) + "' (lomo computes silu)");
    }
  }
  if (fields.bool_or("attention_bias", false)) {
    fields.fail("attention_bias", "attention projections with bias are not supported");
  }
  if (fields.bool_or("mlp_bias", false)) {
    fields.fail("mlp_bias", "MLP projections with bias are not supported");
  }
}

// `rope` holds rope_scaling (or, in transformers >= 5, rope_parameters); its type lives under
// "rope_type", or "type" in older files.
RopeScaling parse_rope_scaling(const json& rope, const std::string& source,
                               const std::string& prefix) {
  const FieldReader fields(rope, source, prefix);
  std::optional<std::string> type = fields.string("rope_type");
  const char* type_key = "rope_type";
  if (!type) {
    type = fields.string("type");
    type_key = "type";
  }
  RopeScaling scaling;
  if (!type || *type == "default") return scaling;
  if (*type != "llama3") {
    fields.fail(type_key,
                "unsupported RoPE scaling '" + shortened(*type) + "' (lomo supports llama3)");
  }
  scaling.type = RopeScaling::Type::kLlama3;
  scaling.factor = fields.positive_number("factor");
  scaling.low_freq_factor = fields.positive_number("low_freq_factor");
  scaling.high_freq_factor = fields.positive_number("high_freq_factor");
  scaling.original_max_position_embeddings =
      fields.positive_int("original_max_position_embeddings");
  return scaling;
}

void parse_rope(const FieldReader& fields, const std::string& source, LlamaConfig& config) {
  config.rope_theta = fields.positive_number_or("rope_theta", config.rope_theta);
  if (const json* scaling = fields.object("rope_scaling")) {
    config.rope_scaling = parse_rope_scaling(*scaling, source, "rope_scaling.");
  } else if (const json* parameters = fields.object("rope_parameters")) {
    // transformers >= 5 moves rope_theta and the scaling into one object.
    const FieldReader rope_fields(*parameters, source, "rope_parameters.");
    config.rope_theta = rope_fields.positive_number_or("rope_theta", config.rope_theta);
    config.rope_scaling = parse_rope_scaling(*parameters, source, "rope_parameters.");
  }
}

DType parse_torch_dtype(const FieldReader& fields) {
  // transformers >= 4.56 writes "dtype"; older versions "torch_dtype".
  const char* key = fields.has("torch_dtype") ? "torch_dtype" : "dtype";
  const std::optional<std::string> name = fields.string(key);
  if (!name || *name == "float32") return DType::kF32;
  if (*name == "bfloat16") return DType::kBF16;
  if (*name == "float16") return DType::kF16;
  fields.fail(
      key, "unsupported dtype '" + shortened(*name) + "' (expected float32, bfloat16 or float16)");
}

// The size fields that every config.json carries; transformers' own defaults (a 7B model) would
// only hide a truncated file.
void parse_sizes(const FieldReader& fields, const std::string& source, LlamaConfig& config) {
  config.vocab_size = fields.positive_int("vocab_size");
  config.hidden_size = fields.positive_int("hidden_size");
  config.intermediate_size = fields.positive_int("intermediate_size");
  config.num_hidden_layers = fields.positive_int("num_hidden_layers");
  config.num_attention_heads = fields.positive_int("num_attention_heads");
  config.num_key_value_heads =
      fields.positive_int_or("num_key_value_heads", config.num_attention_heads);
  if (fields.has("head_dim")) {
    config.head_dim = fields.positive_int("head_dim");
  } else {
    if (config.hidden_size % config.num_attention_heads != 0) {
      fail_field(source, "head_dim",
                 "absent, and hidden_size " + std::to_string(config.hidden_size) +
                     " is not divisible by num_attention_heads " +
                     std::to_string(config.num_attention_heads));
    }
    config.head_dim = config.hidden_size / config.num_attention_heads;
  }
  config.max_position_embeddings =
      fields.positive_int_or("max_position_embeddings", config.max_position_embeddings);
}

// True when a [rows, columns] tensor's byte size (at 4 bytes an element) fits in int64.
bool tensor_fits(int64_t rows, int64_t columns) {
  int64_t numel = 0;
  int64_t bytes = 0;
  return !__builtin_mul_overflow(rows, columns, &numel) &&
         !__builtin_mul_overflow(numel, int64_t{4}, &bytes);
}

void check_config(const LlamaConfig& c, const std::string& source) {
  const std::pair<const char*, int64_t> sizes[] = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"max_position_embeddings", c.max_position_embeddings},
  };
  for (const auto& [name, value] : sizes) {
    if (value <= 0) fail_field(source, name, "must be positive, got " + std::to_string(value));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    fail_field(source, "num_key_value_heads",
               std::to_string(c.num_key_value_heads) + " does not divide num_attention_heads " +
                   std::to_string(c.num_attention_heads));
  }
  // RoPE rotates pairs of dimensions.
  if (c.head_dim % 2 != 0) {
    fail_field(source, "head_dim", "must be even for RoPE, got " + std::to_string(c.head_dim));
  }
  int64_t q_width = 0;
  const bool sizes_fit = !__builtin_mul_overflow(c.num_attention_heads, c.head_dim, &q_width) &&
                         tensor_fits(c.vocab_size, c.hidden_size) &&
                         tensor_fits(q_width, c.hidden_size) &&
                         tensor_fits(c.intermediate_size, c.hidden_size);
  if (!sizes_fit) fail_field(source, "hidden_size", "tensor sizes overflow 64-bit byte counts");
  if (!(std::isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0.0)) {
    fail_field(source, "rms_norm_eps", "must be a positive number");
  }
  if (!(std::isfinite(c.rope_theta) && c.rope_theta > 0.0)) {
    fail_field(source, "rope_theta", "must be a positive number");
  }
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    const RopeScaling& s = c.rope_scaling;
    const bool positive = std::isfinite(s.factor) && s.factor > 0.0 &&
                          std::isfinite(s.low_freq_factor) && s.low_freq_factor > 0.0 &&
                          std::isfinite(s.high_freq_factor) &&
                          s.original_max_position_embeddings > 0;
    if (!positive) fail_field(source, "rope_scaling", "llama3 factors must be positive");
    // The llama3 schedule interpolates between the two wavelength bounds: dividing by their gap.
    if (!(s.high_freq_factor > s.low_freq_factor)) {
      fail_field(source, "rope_scaling.high_freq_factor", "must exceed low_freq_factor");
    }
  }
  if (c.bos_token_id < 0) fail_field(source, "bos_token_id", "must be non-negative");
  if (c.eos_token_id < 0) fail_field(source, "eos_token_id", "must be non-negative");
}

std::string_view torch_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "float32";
    case DType::kF16:
      return "float16";
    case DType::kBF16:
      return "bfloat16";
  }
  return "float32";
}

}  // namespace

void LlamaConfig::validate() const { check_config(*this, "LlamaConfig"); }

LlamaConfig parse_llama_config(std::string_view json_text, const std::string& source) {
  const json root = parse_json_text(json_text, source);
  if (!root.is_object()) throw std::invalid_argument(source + ": expected a JSON object");
  const FieldReader fields(root, source, "");
  check_architecture(fields, source);
  check_unsupported_options(fields);

  LlamaConfig config;
  parse_sizes(fields, source, config);
  config.rms_norm_eps = fields.positive_number_or("rms_norm_eps", config.rms_norm_eps);
  parse_rope(fields, source, config);
  config.tie_word_embeddings = fields.bool_or("tie_word_embeddings", config.tie_word_embeddings);
  config.bos_token_id = fields.token_id_or("bos_token_id", config.bos_token_id);
  config.eos_token_id = fields.token_id_or("eos_token_id", config.eos_token_id);
  config.torch_dtype = parse_torch_dtype(fields);
  check_config(config, source);
  return config;
}

LlamaConfig load_llama_config(const std::filesystem::path& path) {
  return parse_llama_config(read_file(path), path.string());
}

std::string llama_config_to_json(const LlamaConfig& config) {
  json rope_scaling = nullptr;
  if (config.rope_scaling.type == RopeScaling::Type::kLlama3) {
    rope_scaling = {
        {"rope_type", "llama3"},
        {"factor", config.rope_scaling.factor},
        {"low_freq_factor", config.rope_scaling.low_freq_factor},
        {"high_freq_factor", config.rope_scaling.high_freq_factor},
        {"original_max_position_embeddings", config.rope_scaling.original_max_position_embeddings},
    };
  }
  const json out = {
      {"architectures", json::array({"LlamaForCausalLM"})},
      {"model_type", "llama"},
      {"vocab_size", config.vocab_size},
      {"hidden_size", config.hidden_size},
      {"intermediate_size", config.intermediate_size},
      {"num_hidden_layers", config.num_hidden_layers},
      {"num_attention_heads", config.num_attention_heads},
      {"num_key_value_heads", config.num_key_value_heads},
      {"head_dim", config.head_dim},
      {"max_position_embeddings", config.max_position_embeddings},
      {"rms_norm_eps", config.rms_norm_eps},
      {"rope_theta", config.rope_theta},
      {"rope_scaling", rope_scaling},
      {"tie_word_embeddings", config.tie_word_embeddings},
      {"bos_token_id", config.bos_token_id},
      {"eos_token_id", config.eos_token_id},
      {"torch_dtype", torch_dtype_name(config.torch_dtype)},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"mlp_bias", false},
      {"pretraining_tp", 1},
      {"initializer_range", 0.02},
      {"use_cache", true},
  };
  return out.dump(2) + "\n";
}

}  // namespace lomo
