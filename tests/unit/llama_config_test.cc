#include "worker/engine/llama_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

namespace lomo {
namespace {

using nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;

// Meta-Llama-3.1-8B's config.json as published (abridged to the fields lomo reads and a few it
// ignores).
constexpr const char* kLlama31Config = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

// Llama-2-7b-hf's config.json: no head_dim, no rope_scaling (null), MHA.
constexpr const char* kLlama2Config = R"({
  "architectures": ["LlamaForCausalLM"],
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 11008,
  "max_position_embeddings": 4096,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 32,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "tie_word_embeddings": false,
  "torch_dtype": "float16",
  "transformers_version": "4.31.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
})";

json minimal_config() {
  return json::parse(R"({
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4
  })");
}

LlamaConfig parse(const json& config) { return parse_llama_config(config.dump(), "config.json"); }

// The message of the std::invalid_argument that parsing `text` throws.
std::string parse_error(const std::string& text) {
  try {
    parse_llama_config(text, "config.json");
  } catch (const std::invalid_argument& error) {
    return error.what();
  }
  ADD_FAILURE() << "parsing did not throw: " << text;
  return "";
}

std::string parse_error(const json& config) { return parse_error(config.dump()); }

json with(json config, const std::string& key, json value) {
  config[key] = std::move(value);
  return config;
}

// Qwen2.5-0.5B's config.json as published (transformers 4.x field names).
json qwen2_config() {
  return json::parse(R"({
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": true,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": true,
    "use_sliding_window": false,
    "vocab_size": 151936
  })");
}

void expect_same_config(const LlamaConfig& a, const LlamaConfig& b) {
  EXPECT_EQ(a.family, b.family);
  EXPECT_EQ(a.qkv_bias, b.qkv_bias);
  EXPECT_EQ(a.o_proj_bias, b.o_proj_bias);
  EXPECT_EQ(a.mlp_bias, b.mlp_bias);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);  // exact: JSON numbers round-trip doubles
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rope_scaling.type, b.rope_scaling.type);
  EXPECT_EQ(a.rope_scaling.factor, b.rope_scaling.factor);
  EXPECT_EQ(a.rope_scaling.low_freq_factor, b.rope_scaling.low_freq_factor);
  EXPECT_EQ(a.rope_scaling.high_freq_factor, b.rope_scaling.high_freq_factor);
  EXPECT_EQ(a.rope_scaling.original_max_position_embeddings,
            b.rope_scaling.original_max_position_embeddings);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_id, b.eos_token_id);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
}

TEST(LlamaConfigTest, ParsesLlama31ConfigWithLlama3RopeScaling) {
  const LlamaConfig c = parse_llama_config(kLlama31Config, "config.json");
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_id, 128001);  // the first of the list
  EXPECT_EQ(c.torch_dtype, DType::kBF16);
}

TEST(LlamaConfigTest, ParsesLlama2ConfigWithNullRopeScaling) {
  const LlamaConfig c = parse_llama_config(kLlama2Config, "config.json");
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.num_key_value_heads, 32);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_EQ(c.torch_dtype, DType::kF16);
  EXPECT_EQ(c.eos_token_id, 2);
}

TEST(LlamaConfigTest, AbsentOptionalFieldsTakeHuggingFaceDefaults) {
  const LlamaConfig c = parse(minimal_config());
  EXPECT_EQ(c.num_key_value_heads, 4);  // = num_attention_heads
  EXPECT_EQ(c.head_dim, 4);             // = hidden_size / num_attention_heads
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ(c.torch_dtype, DType::kF32);
}

TEST(LlamaConfigTest, NullReadsAsAbsent) {
  json config = minimal_config();
  config["bos_token_id"] = nullptr;
  config["torch_dtype"] = nullptr;
  config["num_key_value_heads"] = nullptr;
  const LlamaConfig c = parse(config);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.torch_dtype, DType::kF32);
  EXPECT_EQ(c.num_key_value_heads, 4);
}

TEST(LlamaConfigTest, ExplicitHeadDimNeedNotDivideHiddenSize) {
  json config = minimal_config();
  config["head_dim"] = 6;
  const LlamaConfig c = parse(config);
  EXPECT_EQ(c.head_dim, 6);
}

TEST(LlamaConfigTest, AcceptsEitherArchitecturesOrModelType) {
  json by_architecture = minimal_config();
  by_architecture.erase("model_type");
  by_architecture["architectures"] = json::array({"LlamaForCausalLM"});
  EXPECT_EQ(parse(by_architecture).vocab_size, 32);
  EXPECT_EQ(parse(minimal_config()).vocab_size, 32);
}

TEST(LlamaConfigTest, AcceptsOlderRopeScalingTypeKey) {
  json config = minimal_config();
  config["rope_scaling"] = {{"type", "llama3"},
                            {"factor", 32.0},
                            {"low_freq_factor", 1.0},
                            {"high_freq_factor", 4.0},
                            {"original_max_position_embeddings", 8192}};
  const LlamaConfig c = parse(config);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c.rope_scaling.factor, 32.0);
}

TEST(LlamaConfigTest, DefaultRopeTypeMeansNoScaling) {
  const LlamaConfig c = parse(with(minimal_config(), "rope_scaling", {{"rope_type", "default"}}));
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
}

// transformers >= 5 writes "dtype" and moves rope_theta and the scaling into rope_parameters.
TEST(LlamaConfigTest, ReadsTransformers5FieldNames) {
  json config = minimal_config();
  config["dtype"] = "bfloat16";
  config["rope_parameters"] = {
      {"rope_type", "llama3"},   {"rope_theta", 500000.0},
      {"factor", 8.0},           {"low_freq_factor", 1.0},
      {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  const LlamaConfig c = parse(config);
  EXPECT_EQ(c.torch_dtype, DType::kBF16);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
}

TEST(LlamaConfigTest, RejectsOtherArchitecturesNamingThem) {
  json gemma = minimal_config();
  gemma["model_type"] = "gemma";
  EXPECT_THAT(parse_error(gemma),
              AllOf(HasSubstr("config.json"), HasSubstr("'model_type'"), HasSubstr("gemma")));

  json phi = minimal_config();
  phi.erase("model_type");
  phi["architectures"] = json::array({"Phi3ForCausalLM"});
  EXPECT_THAT(parse_error(phi), AllOf(HasSubstr("config.json"), HasSubstr("'architectures'"),
                                      HasSubstr("Phi3ForCausalLM")));

  // A config whose two names disagree describes no single model.
  json mixed = minimal_config();
  mixed["architectures"] = json::array({"Qwen2ForCausalLM"});
  EXPECT_THAT(parse_error(mixed), AllOf(HasSubstr("'model_type'"), HasSubstr("contradicts")));

  json unnamed = minimal_config();
  unnamed.erase("model_type");
  EXPECT_THAT(parse_error(unnamed), AllOf(HasSubstr("config.json"), HasSubstr("model_type")));

  EXPECT_THAT(parse_error(with(minimal_config(), "architectures", "LlamaForCausalLM")),
              HasSubstr("field 'architectures': expected a list of strings"));
}

TEST(LlamaConfigTest, RejectsComputationLomoDoesNotImplement) {
  EXPECT_THAT(parse_error(with(minimal_config(), "hidden_act", "gelu")),
              AllOf(HasSubstr("config.json: field 'hidden_act'"), HasSubstr("gelu")));
  EXPECT_THAT(parse_error(with(minimal_config(), "attention_bias", "no")),
              HasSubstr("config.json: field 'attention_bias': expected true or false"));
  // Qwen2's sliding window covers only the layers from max_window_layers on: a per-layer mix.
  json qwen_window = qwen2_config();
  qwen_window["use_sliding_window"] = true;
  qwen_window["sliding_window"] = 4096;
  qwen_window["max_window_layers"] = 1;
  EXPECT_THAT(parse_error(qwen_window), AllOf(HasSubstr("config.json: field 'use_sliding_window'"),
                                              HasSubstr("qwen2"), HasSubstr("max_window_layers")));
  json qwen_layers = qwen2_config();
  qwen_layers["layer_types"] = json::array({"full_attention", "sliding_attention"});
  EXPECT_THAT(parse_error(qwen_layers), HasSubstr("config.json: field 'layer_types'"));
  // An explicit all-full layer_types list wins over use_sliding_window, as in Qwen2Config.
  qwen_window["layer_types"] = json::array();
  for (int i = 0; i < 24; ++i) qwen_window["layer_types"].push_back("full_attention");
  EXPECT_EQ(parse(qwen_window).sliding_window, 0);
}

// Llama's attention_bias puts a bias on q/k/v/o_proj, mlp_bias on gate/up/down_proj.
TEST(LlamaConfigTest, LlamaBiasFlagsChooseTheProjectionsWithBias) {
  const LlamaConfig plain = parse(minimal_config());
  EXPECT_EQ(plain.family, ModelFamily::kLlama);
  EXPECT_FALSE(plain.qkv_bias || plain.o_proj_bias || plain.mlp_bias);
  const LlamaConfig attention = parse(with(minimal_config(), "attention_bias", true));
  EXPECT_TRUE(attention.qkv_bias && attention.o_proj_bias);
  EXPECT_FALSE(attention.mlp_bias);
  const LlamaConfig mlp = parse(with(minimal_config(), "mlp_bias", true));
  EXPECT_FALSE(mlp.qkv_bias || mlp.o_proj_bias);
  EXPECT_TRUE(mlp.mlp_bias);
  EXPECT_EQ(plain.sliding_window, 0);
}

// Qwen2/Qwen2.5: q/k/v biases always (no config key says so), o_proj none; the sliding window is
// off unless use_sliding_window, and then only if some layer reaches max_window_layers.
TEST(LlamaConfigTest, ParsesQwen2WithQkvBiasesAndItsDefaults) {
  json config = qwen2_config();
  config.erase("max_position_embeddings");
  const LlamaConfig c = parse(config);
  EXPECT_EQ(c.family, ModelFamily::kQwen2);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_proj_bias || c.mlp_bias);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.max_position_embeddings, 32768);  // Qwen2Config's default
  EXPECT_EQ(c.rope_theta, 1000000.0);
  EXPECT_TRUE(c.tie_word_embeddings);
  // use_sliding_window with every layer below max_window_layers slides nowhere.
  config["use_sliding_window"] = true;
  config["max_window_layers"] = 28;
  EXPECT_EQ(parse(config).sliding_window, 0);
  // Identified by its architecture alone, too.
  config.erase("model_type");
  EXPECT_EQ(parse(config).family, ModelFamily::kQwen2);
}

// MistralConfig defaults sliding_window to 4096 when the key is absent and num_key_value_heads to
// 8; null switches the window off.
TEST(LlamaConfigTest, ParsesMistralSlidingWindowAndItsDefaults) {
  json config = minimal_config();
  config["model_type"] = "mistral";
  config["num_attention_heads"] = 8;
  config["hidden_size"] = 32;
  const LlamaConfig absent = parse(config);
  EXPECT_EQ(absent.family, ModelFamily::kMistral);
  EXPECT_EQ(absent.sliding_window, 4096);
  EXPECT_EQ(absent.num_key_value_heads, 8);
  EXPECT_EQ(absent.max_position_embeddings, 4096 * 32);
  EXPECT_FALSE(absent.qkv_bias || absent.o_proj_bias || absent.mlp_bias);
  EXPECT_EQ(parse(with(config, "sliding_window", nullptr)).sliding_window, 0);
  EXPECT_EQ(parse(with(config, "sliding_window", 16)).sliding_window, 16);
  EXPECT_THAT(parse_error(with(config, "sliding_window", 0)),
              HasSubstr("config.json: field 'sliding_window': expected a positive integer"));
  config["architectures"] = json::array({"MistralForCausalLM"});
  EXPECT_EQ(parse(config).family, ModelFamily::kMistral);
}

TEST(LlamaConfigTest, ValidateRejectsBiasesAndWindowsTheFamilyCannotHave) {
  LlamaConfig config = parse(minimal_config());
  config.qkv_bias = true;  // without o_proj's: not expressible as attention_bias
  EXPECT_THAT([&] { config.validate(); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("'attention_bias'")));
  config = parse(minimal_config());
  config.sliding_window = 8;
  EXPECT_THAT([&] { config.validate(); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("'sliding_window'")));
  config = parse(qwen2_config());
  config.qkv_bias = false;
  EXPECT_THROW(config.validate(), std::invalid_argument);
  config = parse(minimal_config());
  config.family = ModelFamily::kMistral;
  config.mlp_bias = true;
  EXPECT_THROW(config.validate(), std::invalid_argument);
}

TEST(LlamaConfigTest, RejectsRopeScalingOtherThanLlama3) {
  const json linear = {{"type", "linear"}, {"factor", 2.0}};
  EXPECT_THAT(parse_error(with(minimal_config(), "rope_scaling", linear)),
              AllOf(HasSubstr("config.json: field 'rope_scaling.type'"), HasSubstr("linear")));
  const json yarn = {{"rope_type", "yarn"}, {"factor", 4.0}};
  EXPECT_THAT(parse_error(with(minimal_config(), "rope_scaling", yarn)),
              AllOf(HasSubstr("'rope_scaling.rope_type'"), HasSubstr("yarn")));
  const json incomplete = {{"rope_type", "llama3"}, {"factor", 8.0}};
  EXPECT_THAT(parse_error(with(minimal_config(), "rope_scaling", incomplete)),
              HasSubstr("config.json: field 'rope_scaling.low_freq_factor': missing"));
  const json equal_bounds = {{"rope_type", "llama3"},
                             {"factor", 8.0},
                             {"low_freq_factor", 4.0},
                             {"high_freq_factor", 4.0},
                             {"original_max_position_embeddings", 8192}};
  EXPECT_THAT(parse_error(with(minimal_config(), "rope_scaling", equal_bounds)),
              HasSubstr("'rope_scaling.high_freq_factor'"));
  EXPECT_THAT(parse_error(with(minimal_config(), "rope_scaling", "llama3")),
              HasSubstr("field 'rope_scaling': expected an object or null"));
}

TEST(LlamaConfigTest, RejectsWrongTypesNamingTheField) {
  EXPECT_THAT(parse_error(with(minimal_config(), "num_attention_heads", "4")),
              HasSubstr("config.json: field 'num_attention_heads': expected a positive integer"));
  EXPECT_THAT(parse_error(with(minimal_config(), "hidden_size", 16.5)),
              HasSubstr("field 'hidden_size': expected a positive integer"));
  EXPECT_THAT(parse_error(with(minimal_config(), "vocab_size", -32)),
              HasSubstr("field 'vocab_size': expected a positive integer"));
  EXPECT_THAT(parse_error(with(minimal_config(), "num_hidden_layers", 0)),
              HasSubstr("field 'num_hidden_layers': expected a positive integer"));
  EXPECT_THAT(parse_error(with(minimal_config(), "vocab_size", json(18446744073709551615ull))),
              HasSubstr("field 'vocab_size': expected a positive integer"));
  EXPECT_THAT(parse_error(with(minimal_config(), "rms_norm_eps", "1e-5")),
              HasSubstr("field 'rms_norm_eps': expected a positive number"));
  EXPECT_THAT(parse_error(with(minimal_config(), "rope_theta", -1.0)),
              HasSubstr("field 'rope_theta': expected a positive number"));
  EXPECT_THAT(parse_error(with(minimal_config(), "rms_norm_eps", 0)),
              HasSubstr("field 'rms_norm_eps': expected a positive number"));
  EXPECT_THAT(parse_error(with(minimal_config(), "tie_word_embeddings", 1)),
              HasSubstr("field 'tie_word_embeddings': expected true or false"));
  EXPECT_THAT(parse_error(with(minimal_config(), "model_type", 7)),
              HasSubstr("field 'model_type': expected a string"));
  EXPECT_THAT(parse_error(with(minimal_config(), "eos_token_id", json::array())),
              HasSubstr("field 'eos_token_id'"));
  EXPECT_THAT(parse_error(with(minimal_config(), "eos_token_id", {"</s>"})),
              HasSubstr("field 'eos_token_id': expected a non-negative integer token id"));
  EXPECT_THAT(parse_error(with(minimal_config(), "bos_token_id", -1)),
              HasSubstr("field 'bos_token_id'"));
}

TEST(LlamaConfigTest, RejectsUnsupportedTorchDtype) {
  EXPECT_THAT(parse_error(with(minimal_config(), "torch_dtype", "float64")),
              AllOf(HasSubstr("config.json: field 'torch_dtype'"), HasSubstr("float64")));
  EXPECT_THAT(parse_error(with(minimal_config(), "dtype", "int8")),
              AllOf(HasSubstr("field 'dtype'"), HasSubstr("int8")));
}

TEST(LlamaConfigTest, RejectsMissingRequiredFields) {
  for (const char* field : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads"}) {
    json config = minimal_config();
    config.erase(field);
    EXPECT_THAT(parse_error(config),
                HasSubstr(std::string("config.json: field '") + field + "': missing"));
  }
}

TEST(LlamaConfigTest, RejectsShapesLomoCannotCompute) {
  EXPECT_THAT(
      parse_error(with(minimal_config(), "num_key_value_heads", 3)),
      AllOf(HasSubstr("config.json: field 'num_key_value_heads'"), HasSubstr("does not divide")));
  EXPECT_THAT(parse_error(with(minimal_config(), "head_dim", 5)),
              HasSubstr("config.json: field 'head_dim': must be even"));
  EXPECT_THAT(parse_error(with(minimal_config(), "num_attention_heads", 3)),
              HasSubstr("config.json: field 'head_dim': absent, and hidden_size 16 is not "
                        "divisible by num_attention_heads 3"));
  json huge = minimal_config();
  huge["vocab_size"] = int64_t{1} << 40;
  huge["hidden_size"] = int64_t{1} << 40;
  EXPECT_THAT(parse_error(huge), HasSubstr("overflow"));
}

TEST(LlamaConfigTest, RejectsInvalidJsonNamingTheFile) {
  EXPECT_THAT(parse_error(std::string("{\"vocab_size\": ")),
              HasSubstr("config.json: invalid JSON"));
  EXPECT_THAT(parse_error(std::string("[1, 2]")), HasSubstr("config.json: expected a JSON object"));
  EXPECT_THAT(parse_error(std::string(100, '[') + std::string(100, ']')),
              HasSubstr("config.json: invalid JSON: nested deeper"));
  EXPECT_THAT(parse_error(std::string("")), HasSubstr("config.json: invalid JSON"));
  EXPECT_THAT(parse_error(std::string("{\"rope_theta\": 1e400}")),
              HasSubstr("config.json: invalid JSON"));
}

TEST(LlamaConfigTest, ValidateRejectsInconsistentStruct) {
  LlamaConfig config = parse(minimal_config());
  EXPECT_NO_THROW(config.validate());
  config.num_key_value_heads = 3;
  EXPECT_THROW(config.validate(), std::invalid_argument);
  config = parse(minimal_config());
  config.rope_theta = 0.0;
  EXPECT_THAT([&] { config.validate(); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("'rope_theta'")));
  config = parse(minimal_config());
  config.rms_norm_eps = -1e-6;
  EXPECT_THROW(config.validate(), std::invalid_argument);
  config = parse(minimal_config());
  config.hidden_size = 0;
  EXPECT_THROW(config.validate(), std::invalid_argument);
}

TEST(LlamaConfigTest, JsonRoundTripPreservesEveryField) {
  const LlamaConfig original = parse_llama_config(kLlama31Config, "config.json");
  expect_same_config(parse_llama_config(llama_config_to_json(original), "again.json"), original);

  LlamaConfig tied = parse(minimal_config());
  tied.tie_word_embeddings = true;
  tied.torch_dtype = DType::kF16;
  tied.rms_norm_eps = 1e-5;
  expect_same_config(parse_llama_config(llama_config_to_json(tied), "again.json"), tied);
}

// The fields transformers.LlamaConfig reads, under their Hugging Face names and types, for a config
// built in code (a parsed one writes its own document back: ToJsonKeepsEveryKeyLomoDoesNotOwn).
TEST(LlamaConfigTest, ToJsonWritesHuggingFaceFieldNames) {
  LlamaConfig config = parse(minimal_config());
  config.source_json.clear();
  config.torch_dtype = DType::kBF16;
  const json out = json::parse(llama_config_to_json(config));
  EXPECT_EQ(out["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(out["model_type"], "llama");
  EXPECT_EQ(out["hidden_act"], "silu");
  EXPECT_EQ(out["torch_dtype"], "bfloat16");
  EXPECT_TRUE(out["rope_scaling"].is_null());
  EXPECT_EQ(out["tie_word_embeddings"], false);
  EXPECT_EQ(out["attention_bias"], false);
  EXPECT_EQ(out["mlp_bias"], false);
  EXPECT_EQ(out["num_key_value_heads"], 4);
  EXPECT_EQ(out["head_dim"], 4);
  EXPECT_TRUE(out["vocab_size"].is_number_integer());
  EXPECT_TRUE(out["rms_norm_eps"].is_number_float());

  const json llama31 =
      json::parse(llama_config_to_json(parse_llama_config(kLlama31Config, "config.json")));
  EXPECT_EQ(llama31["rope_scaling"]["rope_type"], "llama3");
  EXPECT_EQ(llama31["rope_scaling"]["factor"], 8.0);
  EXPECT_EQ(llama31["rope_scaling"]["original_max_position_embeddings"], 8192);
}

// What lomo does not model survives a save: the key transformers added (pad_token_id), keys of
// newer versions it cannot know, the eos list, and the document's own forms (dtype,
// rope_parameters) are written back as they were.
TEST(LlamaConfigTest, ToJsonKeepsEveryKeyLomoDoesNotOwn) {
  json original = minimal_config();
  original["pad_token_id"] = 0;
  original["some_future_key"] = {{"nested", json::array({1, 2})}};
  original["eos_token_id"] = json::array({2, 7});
  original["dtype"] = "bfloat16";
  original["rope_parameters"] = {
      {"rope_type", "default"}, {"rope_theta", 250000.0}, {"partial_rotary_factor", 1.0}};
  LlamaConfig config = parse(original);
  config.torch_dtype = DType::kF32;  // saved in another storage dtype
  const json out = json::parse(llama_config_to_json(config));
  EXPECT_EQ(out["pad_token_id"], 0);
  EXPECT_EQ(out["some_future_key"], original["some_future_key"]);
  EXPECT_EQ(out["eos_token_id"], json::array({2, 7}));
  EXPECT_EQ(out["dtype"], "float32");
  EXPECT_FALSE(out.contains("torch_dtype"));
  EXPECT_EQ(out["rope_parameters"]["rope_theta"], 250000.0);
  EXPECT_EQ(out["rope_parameters"]["partial_rotary_factor"], 1.0);
  EXPECT_FALSE(out.contains("rope_scaling"));
  EXPECT_FALSE(out.contains("rope_theta"));
  for (const auto& [key, value] : original.items()) {
    if (key == "dtype") continue;
    EXPECT_EQ(out[key], value) << key;
  }
  expect_same_config(parse_llama_config(out.dump(), "again.json"), config);
}

TEST(LlamaConfigTest, ToJsonWritesEachFamilysArchitectureAndOptions) {
  const LlamaConfig qwen = parse(qwen2_config());
  const json qwen_out = json::parse(llama_config_to_json(qwen));
  EXPECT_EQ(qwen_out["architectures"], json::array({"Qwen2ForCausalLM"}));
  EXPECT_EQ(qwen_out["model_type"], "qwen2");
  EXPECT_EQ(qwen_out["use_sliding_window"], false);
  EXPECT_EQ(qwen_out["max_window_layers"], 24);  // kept
  expect_same_config(parse_llama_config(qwen_out.dump(), "again.json"), qwen);

  LlamaConfig mistral = parse(minimal_config());  // built in code: no source document
  mistral.source_json.clear();
  mistral.family = ModelFamily::kMistral;
  mistral.sliding_window = 5;
  const json mistral_out = json::parse(llama_config_to_json(mistral));
  EXPECT_EQ(mistral_out["architectures"], json::array({"MistralForCausalLM"}));
  EXPECT_EQ(mistral_out["sliding_window"], 5);
  EXPECT_FALSE(mistral_out.contains("attention_bias"));
  expect_same_config(parse_llama_config(mistral_out.dump(), "again.json"), mistral);
  mistral.sliding_window = 0;  // written as null: absent would mean MistralConfig's 4096
  EXPECT_TRUE(json::parse(llama_config_to_json(mistral))["sliding_window"].is_null());
  expect_same_config(parse_llama_config(llama_config_to_json(mistral), "again.json"), mistral);

  LlamaConfig biased = parse(with(minimal_config(), "mlp_bias", true));
  biased.source_json.clear();
  const json biased_out = json::parse(llama_config_to_json(biased));
  EXPECT_EQ(biased_out["mlp_bias"], true);
  EXPECT_EQ(biased_out["attention_bias"], false);
}

TEST(LlamaConfigTest, LoadNamesTheFile) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("lomo_config_test_" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const std::filesystem::path path = dir / "config.json";
  EXPECT_THAT([&] { load_llama_config(path); },
              ::testing::ThrowsMessage<std::runtime_error>(HasSubstr(path.string())));
  std::ofstream(path) << with(minimal_config(), "hidden_act", "relu").dump();
  EXPECT_THAT([&] { load_llama_config(path); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  AllOf(HasSubstr(path.string()), HasSubstr("'hidden_act'"))));
  std::ofstream(path) << minimal_config().dump();
  EXPECT_EQ(load_llama_config(path).hidden_size, 16);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace lomo
