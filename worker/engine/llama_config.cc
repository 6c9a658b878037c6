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

struct FamilyNames {
  ModelFamily family;
  const char* architecture;
  const char* model_type;
};

constexpr FamilyNames kFamilies[] = {
    {ModelFamily::kLlama, "LlamaForCausalLM", "llama"},
    {ModelFamily::kMistral, "MistralForCausalLM", "mistral"},
    {ModelFamily::kQwen2, "Qwen2ForCausalLM", "qwen2"},
};

const FamilyNames& names_of(ModelFamily family) {
  for (const FamilyNames& names : kFamilies) {
    if (names.family == family) return names;
  }
  return kFamilies[0];
}

const FamilyNames* family_by_architecture(const json& name) {
  for (const FamilyNames& names : kFamilies) {
    if (name == names.architecture) return &names;
  }
  return nullptr;
}

const FamilyNames* family_by_model_type(std::string_view model_type) {
  for (const FamilyNames& names : kFamilies) {
    if (model_type == names.model_type) return &names;
  }
  return nullptr;
}

constexpr const char* kSupportedArchitectures =
    "LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM";

// Only the decoder families lomo computes are loaded; anything else must be named and refused
// rather than loaded with the wrong math. When both fields are present they must agree.
ModelFamily check_architecture(const FieldReader& fields, const std::string& source) {
  const FamilyNames* by_architecture = nullptr;
  if (fields.has("architectures")) {
    const json& list = *fields.get("architectures");
    if (!list.is_array()) fields.fail("architectures", "expected a list of strings");
    std::string names;
    for (const json& name : list) {
      if (!name.is_string()) fields.fail("architectures", "expected a list of strings");
      if (names.size() < 400) {  // a hostile list could be megabytes long
        names += (names.empty() ? "" : ", ") + shortened(name.get<std::string>());
      }
      if (by_architecture == nullptr) by_architecture = family_by_architecture(name);
    }
    if (by_architecture == nullptr) {
      fields.fail("architectures", "unsupported architecture [" + names + "] (lomo loads " +
                                       kSupportedArchitectures + ")");
    }
  }
  const FamilyNames* by_model_type = nullptr;
  if (const std::optional<std::string> model_type = fields.string("model_type")) {
    by_model_type = family_by_model_type(*model_type);
    if (by_model_type == nullptr) {
      fields.fail("model_type", "unsupported model type '" + shortened(*model_type) +
                                    "' (expected 'llama', 'mistral' or 'qwen2')");
    }
  }
  if (by_architecture != nullptr && by_model_type != nullptr && by_architecture != by_model_type) {
    fields.fail("model_type", std::string("'") + by_model_type->model_type +
                                  "' contradicts architectures " + by_architecture->architecture);
  }
  if (by_architecture == nullptr && by_model_type == nullptr) {
    throw std::invalid_argument(source +
                                ": neither 'architectures' nor 'model_type' names a model lomo "
                                "computes (expected " +
                                kSupportedArchitectures + ")");
  }
  return (by_architecture != nullptr ? by_architecture : by_model_type)->family;
}

void check_activation(const FieldReader& fields) {
  if (const std::optional<std::string> act = fields.string("hidden_act")) {
    if (*act != "silu") {
      fields.fail("hidden_act",
                  "unsupported activation '" + shortened(*act) + "' (lomo computes silu)");
    }
  }
}

// Qwen2 slides its window only over layers >= max_window_layers when use_sliding_window is set: a
// per-layer mix lomo does not compute. Official Qwen2/Qwen2.5 configs leave it off. As in
// Qwen2Config, an explicit layer_types list (transformers >= 5 writes one) decides alone.
void check_qwen2_full_attention(const FieldReader& fields, int64_t num_layers) {
  if (const json* types = fields.get("layer_types")) {
    if (!types->is_array()) fields.fail("layer_types", "expected a list of strings");
    for (const json& type : *types) {
      if (type == "sliding_attention") {
        fields.fail("layer_types", "sliding_attention layers are not supported for qwen2");
      }
    }
    return;
  }
  if (!fields.bool_or("use_sliding_window", false) || !fields.has("sliding_window")) return;
  const int64_t full_layers = fields.positive_int_or("max_window_layers", 28);
  if (num_layers > full_layers) {
    fields.fail(
        "use_sliding_window",
        "true: qwen2's sliding window over the layers >= max_window_layers is not supported");
  }
}

// Biases and the attention window, as each family's transformers class builds its layers.
void parse_family_options(const FieldReader& fields, const json& root, LlamaConfig& config) {
  switch (config.family) {
    case ModelFamily::kLlama: {
      const bool attention_bias = fields.bool_or("attention_bias", false);
      config.qkv_bias = attention_bias;
      config.o_proj_bias = attention_bias;
      config.mlp_bias = fields.bool_or("mlp_bias", false);
      break;
    }
    case ModelFamily::kMistral:
      // MistralConfig defaults sliding_window to 4096 when the key is absent; null disables it.
      if (!root.contains("sliding_window")) {
        config.sliding_window = 4096;
      } else {
        config.sliding_window = fields.positive_int_or("sliding_window", 0);
      }
      break;
    case ModelFamily::kQwen2:
      config.qkv_bias = true;  // Qwen2Attention always has q/k/v biases (and none on o_proj)
      check_qwen2_full_attention(fields, config.num_hidden_layers);
      break;
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

// Defaults of the family's transformers class for absent keys: MistralConfig has 8 key/value heads
// and 4096·32 positions, Qwen2Config 32768 positions; LlamaConfig one key/value head per attention
// head and 2048 positions.
int64_t default_key_value_heads(ModelFamily family, int64_t attention_heads) {
  return family == ModelFamily::kMistral ? 8 : attention_heads;
}

int64_t default_max_position_embeddings(ModelFamily family) {
  switch (family) {
    case ModelFamily::kMistral:
      return 4096 * 32;
    case ModelFamily::kQwen2:
      return 32768;
    case ModelFamily::kLlama:
      break;
  }
  return 2048;
}

// The size fields that every config.json carries; transformers' own defaults (a 7B model) would
// only hide a truncated file.
void parse_sizes(const FieldReader& fields, const std::string& source, LlamaConfig& config) {
  config.vocab_size = fields.positive_int("vocab_size");
  config.hidden_size = fields.positive_int("hidden_size");
  config.intermediate_size = fields.positive_int("intermediate_size");
  config.num_hidden_layers = fields.positive_int("num_hidden_layers");
  config.num_attention_heads = fields.positive_int("num_attention_heads");
  config.num_key_value_heads = fields.positive_int_or(
      "num_key_value_heads", default_key_value_heads(config.family, config.num_attention_heads));
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
  config.max_position_embeddings = fields.positive_int_or(
      "max_position_embeddings", default_max_position_embeddings(config.family));
}

// True when a [rows, columns] tensor's byte size (at 4 bytes an element) fits in int64.
bool tensor_fits(int64_t rows, int64_t columns) {
  int64_t numel = 0;
  int64_t bytes = 0;
  return !__builtin_mul_overflow(rows, columns, &numel) &&
         !__builtin_mul_overflow(numel, int64_t{4}, &bytes);
}

// What each family's transformers class can express: a struct built in code must not describe a
// model that no config.json of its family could (it would be saved as a different model).
void check_family_consistency(const LlamaConfig& c, const std::string& source) {
  const char* family = names_of(c.family).model_type;
  switch (c.family) {
    case ModelFamily::kLlama:
      if (c.qkv_bias != c.o_proj_bias) {
        fail_field(source, "attention_bias",
                   "llama has biases on all of q/k/v/o_proj or on none of them");
      }
      if (c.sliding_window != 0) {
        fail_field(source, "sliding_window", "llama has no sliding-window attention");
      }
      return;
    case ModelFamily::kMistral:
      if (c.qkv_bias || c.o_proj_bias || c.mlp_bias) {
        fail_field(source, "attention_bias", std::string(family) + " has no projection biases");
      }
      return;
    case ModelFamily::kQwen2:
      if (!c.qkv_bias || c.o_proj_bias || c.mlp_bias) {
        fail_field(source, "attention_bias", "qwen2 has biases on q/k/v_proj and on nothing else");
      }
      if (c.sliding_window != 0) {
        fail_field(source, "sliding_window", "qwen2's sliding window is not supported");
      }
      return;
  }
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
  if (c.sliding_window < 0) fail_field(source, "sliding_window", "must be positive or null");
  check_family_consistency(c, source);
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

// The writers below set what LlamaConfig models and leave every other key of `out` alone.
void write_architecture(const LlamaConfig& config, json& out) {
  const FamilyNames& names = names_of(config.family);
  out["architectures"] = json::array({names.architecture});
  out["model_type"] = names.model_type;
  out["hidden_act"] = "silu";
}

// Sets `key` unless a source document left it out and the value is what absence means: a saved
// config gains no key its model directory did not have.
template <typename T>
void set_unless_implied(json& out, bool from_source, const char* key, const T& value,
                        const T& implied) {
  if (!from_source || out.contains(key) || value != implied) out[key] = value;
}

void write_sizes(const LlamaConfig& config, bool from_source, json& out) {
  out["vocab_size"] = config.vocab_size;
  out["hidden_size"] = config.hidden_size;
  out["intermediate_size"] = config.intermediate_size;
  out["num_hidden_layers"] = config.num_hidden_layers;
  out["num_attention_heads"] = config.num_attention_heads;
  // What parse_sizes reads when the keys are absent is written back as absent.
  set_unless_implied(out, from_source, "num_key_value_heads", config.num_key_value_heads,
                     default_key_value_heads(config.family, config.num_attention_heads));
  const bool head_dim_implied = config.hidden_size % config.num_attention_heads == 0 &&
                                config.head_dim == config.hidden_size / config.num_attention_heads;
  if (!from_source || out.contains("head_dim") || !head_dim_implied) {
    out["head_dim"] = config.head_dim;
  }
  set_unless_implied(out, from_source, "max_position_embeddings", config.max_position_embeddings,
                     default_max_position_embeddings(config.family));
  set_unless_implied(out, from_source, "rms_norm_eps", config.rms_norm_eps, 1e-6);
  set_unless_implied(out, from_source, "tie_word_embeddings", config.tie_word_embeddings, false);
}

json rope_scaling_json(const RopeScaling& scaling) {
  if (scaling.type != RopeScaling::Type::kLlama3) return nullptr;
  return {
      {"rope_type", "llama3"},
      {"factor", scaling.factor},
      {"low_freq_factor", scaling.low_freq_factor},
      {"high_freq_factor", scaling.high_freq_factor},
      {"original_max_position_embeddings", scaling.original_max_position_embeddings},
  };
}

// transformers >= 5 keeps rope_theta and the scaling in rope_parameters; older files use a
// top-level rope_theta and rope_scaling. The document's own form is kept (keys of the rope object
// that lomo does not model, such as a partial_rotary_factor, too).
void write_rope(const LlamaConfig& config, json& out) {
  const auto parameters = out.find("rope_parameters");
  const bool transformers5 = parameters != out.end() && parameters->is_object() &&
                             !(out.contains("rope_scaling") && out["rope_scaling"].is_object());
  if (!transformers5) {
    out["rope_theta"] = config.rope_theta;
    out["rope_scaling"] = rope_scaling_json(config.rope_scaling);
    return;
  }
  json& rope = *parameters;
  rope["rope_theta"] = config.rope_theta;
  if (config.rope_scaling.type == RopeScaling::Type::kNone) {
    for (const char* key : {"factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings", "type"}) {
      rope.erase(key);
    }
    rope["rope_type"] = "default";
  } else {
    rope.erase("type");
    rope.update(rope_scaling_json(config.rope_scaling));
  }
  if (out.contains("rope_theta")) out["rope_theta"] = config.rope_theta;
}

void write_token_ids(const LlamaConfig& config, json& out) {
  out["bos_token_id"] = config.bos_token_id;
  // A list of end-of-sequence ids (Llama 3 instruct lists three) stays a list when lomo's
  // canonical id is its first.
  const auto eos = out.find("eos_token_id");
  const bool keep_list = eos != out.end() && eos->is_array() && !eos->empty() &&
                         (*eos)[0].is_number_integer() && (*eos)[0] == config.eos_token_id;
  if (!keep_list) out["eos_token_id"] = config.eos_token_id;
}

// transformers >= 4.56 writes "dtype", older versions "torch_dtype": the document's key is
// refreshed (both when it has both), "torch_dtype" when it has neither.
void write_dtype(const LlamaConfig& config, json& out) {
  const std::string name(torch_dtype_name(config.torch_dtype));
  const bool has_dtype = out.contains("dtype");
  if (has_dtype) out["dtype"] = name;
  if (!has_dtype || out.contains("torch_dtype")) out["torch_dtype"] = name;
}

void write_family_options(const LlamaConfig& config, json& out) {
  switch (config.family) {
    case ModelFamily::kLlama:
      out["attention_bias"] = config.qkv_bias;
      out["mlp_bias"] = config.mlp_bias;
      if (!out.contains("attention_dropout")) out["attention_dropout"] = 0.0;
      if (!out.contains("pretraining_tp")) out["pretraining_tp"] = 1;
      break;
    case ModelFamily::kMistral:
      out["sliding_window"] = config.sliding_window > 0 ? json(config.sliding_window) : json();
      break;
    case ModelFamily::kQwen2:
      out["use_sliding_window"] = false;
      break;
  }
  if (!out.contains("initializer_range")) out["initializer_range"] = 0.02;
  if (!out.contains("use_cache")) out["use_cache"] = true;
}

}  // namespace

void LlamaConfig::validate() const { check_config(*this, "LlamaConfig"); }

LlamaConfig parse_llama_config(std::string_view json_text, const std::string& source) {
  const json root = parse_json_text(json_text, source);
  if (!root.is_object()) throw std::invalid_argument(source + ": expected a JSON object");
  const FieldReader fields(root, source, "");
  LlamaConfig config;
  config.family = check_architecture(fields, source);
  check_activation(fields);
  parse_sizes(fields, source, config);
  parse_family_options(fields, root, config);
  config.rms_norm_eps = fields.positive_number_or("rms_norm_eps", config.rms_norm_eps);
  parse_rope(fields, source, config);
  config.tie_word_embeddings = fields.bool_or("tie_word_embeddings", config.tie_word_embeddings);
  config.bos_token_id = fields.token_id_or("bos_token_id", config.bos_token_id);
  config.eos_token_id = fields.token_id_or("eos_token_id", config.eos_token_id);
  config.torch_dtype = parse_torch_dtype(fields);
  check_config(config, source);
  config.source_json = std::string(json_text);
  return config;
}

LlamaConfig load_llama_config(const std::filesystem::path& path) {
  return parse_llama_config(read_file(path), path.string());
}

std::string_view architecture_name(ModelFamily family) { return names_of(family).architecture; }

std::string llama_config_to_json(const LlamaConfig& config) {
  json out = json::object();
  if (!config.source_json.empty()) {
    // Parsed once already; a document that no longer parses is a caller's bug, not input.
    out = json::parse(config.source_json);
  }
  write_architecture(config, out);
  write_sizes(config, !config.source_json.empty(), out);
  write_rope(config, out);
  write_token_ids(config, out);
  write_dtype(config, out);
  write_family_options(config, out);
  return out.dump(2) + "\n";
}

}  // namespace lomo
