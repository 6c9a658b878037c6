#include "worker/engine/checkpoint_io.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace lomo {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;

LlamaConfig tiny_config(bool tied) {
  LlamaConfig config;
  config.vocab_size = 32;
  config.hidden_size = 16;
  config.intermediate_size = 24;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 4;
  config.num_key_value_heads = 2;
  config.head_dim = 4;
  config.tie_word_embeddings = tied;
  return config;
}

LlamaWeights random_weights(const LlamaConfig& config, DType storage, MemoryAccountant& accountant,
                            uint64_t seed = 1) {
  LlamaWeights weights(config, storage, accountant);
  weights.init_random(seed, 0.5f);
  return weights;
}

// Every parameter's name, shape, dtype and bytes equal.
void expect_bit_identical(const LlamaWeights& a, const LlamaWeights& b) {
  ASSERT_EQ(a.parameters().size(), b.parameters().size());
  for (size_t i = 0; i < a.parameters().size(); ++i) {
    const Parameter& x = a.parameters()[i];
    const Parameter& y = b.parameters()[i];
    EXPECT_EQ(x.name, y.name);
    EXPECT_EQ(x.shape, y.shape) << x.name;
    EXPECT_EQ(x.dtype, y.dtype) << x.name;
    ASSERT_EQ(x.size_bytes(), y.size_bytes()) << x.name;
    EXPECT_EQ(std::memcmp(x.storage.data(), y.storage.data(), x.size_bytes()), 0) << x.name;
  }
}

std::vector<float> as_floats(const Parameter& parameter) {
  std::vector<float> values(static_cast<size_t>(parameter.numel()));
  convert_to_float(parameter.dtype, parameter.storage.data(), values.data(), values.size());
  return values;
}

json read_json(const fs::path& path) {
  std::ifstream in(path);
  return json::parse(in);
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::vector<SafetensorsTensorView> views_of(const LlamaWeights& weights) {
  std::vector<SafetensorsTensorView> views;
  for (const Parameter& p : weights.parameters()) {
    views.push_back({p.name, p.dtype, p.shape, p.storage.data()});
  }
  return views;
}

class CheckpointIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "_" + info->name();
    for (char& c : name) c = (c == '/') ? '_' : c;
    dir_ = fs::temp_directory_path() / ("lomo_ckpt_" + name + "_" + std::to_string(getpid()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // A checkpoint directory holding `config` and exactly `tensors` in one model.safetensors.
  void write_checkpoint(const LlamaConfig& config,
                        const std::vector<SafetensorsTensorView>& tensors) {
    fs::create_directories(dir_);
    write_text(dir_ / "config.json", llama_config_to_json(config));
    write_safetensors(dir_ / "model.safetensors", tensors);
  }

  // The message of the CheckpointError that loading dir_ throws.
  std::string load_error(DType storage = DType::kF32) {
    try {
      load_llama_checkpoint(dir_, storage, accountant_);
    } catch (const CheckpointError& error) {
      return error.what();
    }
    ADD_FAILURE() << "loading " << dir_ << " did not throw";
    return "";
  }

  // Saves tiny weights in shards of at most 2 KB, so that the index path is exercised.
  LlamaWeights save_sharded() {
    LlamaWeights weights = random_weights(tiny_config(false), DType::kF32, accountant_);
    save_llama_checkpoint(weights, dir_, SaveOptions{.max_shard_bytes = 2048});
    return weights;
  }

  fs::path dir_;
  MemoryAccountant accountant_;
};

// (storage dtype, tied embeddings, sharded)
class CheckpointRoundTripTest
    : public CheckpointIoTest,
      public ::testing::WithParamInterface<std::tuple<DType, bool, bool>> {};

TEST_P(CheckpointRoundTripTest, SaveThenLoadIsBitExact) {
  const auto [storage, tied, sharded] = GetParam();
  const LlamaWeights saved = random_weights(tiny_config(tied), storage, accountant_, 42);
  SaveOptions options;
  if (sharded) options.max_shard_bytes = 1024;
  save_llama_checkpoint(saved, dir_, options);

  EXPECT_EQ(fs::exists(dir_ / "model.safetensors"), !sharded);
  EXPECT_EQ(fs::exists(dir_ / "model.safetensors.index.json"), sharded);
  const LlamaWeights loaded = load_llama_checkpoint(dir_, storage, accountant_);
  expect_bit_identical(saved, loaded);
  EXPECT_EQ(loaded.config().tie_word_embeddings, tied);
  EXPECT_EQ(loaded.config().torch_dtype, storage);
}

std::string round_trip_name(const ::testing::TestParamInfo<std::tuple<DType, bool, bool>>& info) {
  const auto [storage, tied, sharded] = info.param;
  return std::string(dtype_name(storage)) + (tied ? "_tied" : "_untied") +
         (sharded ? "_sharded" : "_single");
}

INSTANTIATE_TEST_SUITE_P(AllLayouts, CheckpointRoundTripTest,
                         ::testing::Combine(::testing::Values(DType::kF32, DType::kBF16,
                                                              DType::kF16),
                                            ::testing::Bool(), ::testing::Bool()),
                         round_trip_name);

TEST_F(CheckpointIoTest, ShardedSaveWritesHuggingFaceIndex) {
  const LlamaWeights weights = save_sharded();
  const json index = read_json(dir_ / "model.safetensors.index.json");
  uint64_t total = 0;
  for (const Parameter& p : weights.parameters()) total += p.size_bytes();
  EXPECT_EQ(index["metadata"]["total_size"], total);

  const json& map = index["weight_map"];
  EXPECT_EQ(map.size(), weights.parameters().size());
  std::set<std::string> shards;
  for (const auto& [tensor, shard] : map.items()) shards.insert(shard.get<std::string>());
  ASSERT_GT(shards.size(), 1u);
  const std::string count = std::to_string(shards.size());
  EXPECT_TRUE(shards.contains("model-00001-of-" + std::string(5 - count.size(), '0') + count +
                              ".safetensors"));
  for (const std::string& shard : shards) {
    const SafetensorsFile file = SafetensorsFile::open(dir_ / shard);
    uint64_t bytes = 0;
    for (const SafetensorsTensorInfo& tensor : file.tensors()) {
      bytes += tensor.size_bytes();
      EXPECT_EQ(map[tensor.name], shard);
    }
    // A shard exceeds the limit only when one tensor alone does.
    EXPECT_TRUE(bytes <= 2048 || file.tensors().size() == 1) << shard;
    EXPECT_EQ(file.header().metadata.at("format"), "pt");
  }
}

TEST_F(CheckpointIoTest, ConfigRecordsStorageDtype) {
  const LlamaWeights weights = random_weights(tiny_config(true), DType::kBF16, accountant_);
  save_llama_checkpoint(weights, dir_);
  const json config = read_json(dir_ / "config.json");
  EXPECT_EQ(config["torch_dtype"], "bfloat16");
  EXPECT_EQ(config["tie_word_embeddings"], true);
  EXPECT_EQ(config["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(load_llama_config(dir_ / "config.json").num_key_value_heads, 2);
}

TEST_F(CheckpointIoTest, SavingAnotherLayoutRemovesStaleWeightFiles) {
  save_sharded();
  ASSERT_TRUE(fs::exists(dir_ / "model.safetensors.index.json"));
  write_text(dir_ / "tokenizer.json", "{}");  // not a weight file: must survive

  const LlamaWeights single = random_weights(tiny_config(false), DType::kF32, accountant_, 7);
  save_llama_checkpoint(single, dir_);
  std::set<std::string> names;
  for (const auto& item : fs::directory_iterator(dir_)) names.insert(item.path().filename());
  EXPECT_EQ(names, (std::set<std::string>{"config.json", "model.safetensors", "tokenizer.json"}));
  expect_bit_identical(single, load_llama_checkpoint(dir_, DType::kF32, accountant_));

  const LlamaWeights sharded = save_sharded();
  EXPECT_FALSE(fs::exists(dir_ / "model.safetensors"));
  expect_bit_identical(sharded, load_llama_checkpoint(dir_, DType::kF32, accountant_));
}

TEST_F(CheckpointIoTest, LoadingF32IntoBf16RoundsEachValueToNearestEven) {
  const LlamaWeights saved = random_weights(tiny_config(false), DType::kF32, accountant_);
  save_llama_checkpoint(saved, dir_);
  const LlamaWeights loaded = load_llama_checkpoint(dir_, DType::kBF16, accountant_);
  for (size_t t = 0; t < saved.parameters().size(); ++t) {
    const Parameter& source = saved.parameters()[t];
    const Parameter& target = loaded.parameters()[t];
    ASSERT_EQ(target.dtype, DType::kBF16);
    const auto* values = source.storage.as<float>();
    const auto* bits = target.storage.as<uint16_t>();
    for (int64_t i = 0; i < source.numel(); ++i) {
      ASSERT_EQ(bits[i], float_to_bf16(values[i])) << source.name << "[" << i << "]";
    }
  }
}

TEST_F(CheckpointIoTest, LoadingBf16IntoF32IsExact) {
  const LlamaWeights saved = random_weights(tiny_config(true), DType::kBF16, accountant_);
  save_llama_checkpoint(saved, dir_);
  const LlamaWeights loaded = load_llama_checkpoint(dir_, DType::kF32, accountant_);
  for (size_t t = 0; t < saved.parameters().size(); ++t) {
    EXPECT_EQ(as_floats(saved.parameters()[t]), as_floats(loaded.parameters()[t]));
  }
}

TEST_F(CheckpointIoTest, LoadingF16IntoBf16GoesThroughFloat) {
  const LlamaWeights saved = random_weights(tiny_config(true), DType::kF16, accountant_);
  save_llama_checkpoint(saved, dir_);
  const LlamaWeights loaded = load_llama_checkpoint(dir_, DType::kBF16, accountant_);
  for (size_t t = 0; t < saved.parameters().size(); ++t) {
    const std::vector<float> values = as_floats(saved.parameters()[t]);
    const auto* bits = loaded.parameters()[t].storage.as<uint16_t>();
    for (size_t i = 0; i < values.size(); ++i) ASSERT_EQ(bits[i], float_to_bf16(values[i]));
  }
}

// A tensor of 4M elements converts through a bounded chunk, never a full fp32 copy (16 MiB).
TEST_F(CheckpointIoTest, ConversionWorkspaceIsBoundedByTheChunk) {
  LlamaConfig config = tiny_config(true);
  config.vocab_size = 8192;
  config.hidden_size = 512;
  config.num_attention_heads = 4;
  config.num_key_value_heads = 4;
  config.head_dim = 128;
  config.num_hidden_layers = 1;
  const LlamaWeights saved = random_weights(config, DType::kBF16, accountant_);
  save_llama_checkpoint(saved, dir_);
  accountant_.reset_peaks();
  const LlamaWeights loaded = load_llama_checkpoint(dir_, DType::kF32, accountant_);
  const uint64_t full_fp32_copy = 8192ull * 512 * sizeof(float);
  const uint64_t workspace = accountant_.report().peak(MemoryKind::kWorkspace);
  EXPECT_GT(workspace, 0u);
  EXPECT_LE(workspace, 8u << 20);
  EXPECT_LT(workspace, full_fp32_copy);
  EXPECT_EQ(as_floats(saved.parameters()[0]), as_floats(loaded.parameters()[0]));
}

TEST_F(CheckpointIoTest, TiedCheckpointMayCarryAnLmHeadCopy) {
  const LlamaWeights weights = random_weights(tiny_config(true), DType::kF32, accountant_);
  std::vector<SafetensorsTensorView> views = views_of(weights);
  const Parameter& embed = weights.parameters()[0];
  views.push_back({"lm_head.weight", DType::kF32, embed.shape, embed.storage.data()});
  write_checkpoint(weights.config(), views);
  expect_bit_identical(weights, load_llama_checkpoint(dir_, DType::kF32, accountant_));
}

TEST_F(CheckpointIoTest, RotaryInverseFrequencyBuffersAreIgnored) {
  const LlamaWeights weights = random_weights(tiny_config(false), DType::kF32, accountant_);
  std::vector<SafetensorsTensorView> views = views_of(weights);
  const std::vector<float> inv_freq(2, 1.0f);
  views.push_back(
      {"model.layers.0.self_attn.rotary_emb.inv_freq", DType::kF32, {2}, inv_freq.data()});
  write_checkpoint(weights.config(), views);
  expect_bit_identical(weights, load_llama_checkpoint(dir_, DType::kF32, accountant_));
}

TEST_F(CheckpointIoTest, UnknownTensorIsAnErrorNotSilentlyDropped) {
  const LlamaWeights weights = random_weights(tiny_config(false), DType::kF32, accountant_);
  std::vector<SafetensorsTensorView> views = views_of(weights);
  const std::vector<float> bias(16, 0.0f);
  views.push_back({"model.layers.0.self_attn.q_proj.bias", DType::kF32, {16}, bias.data()});
  write_checkpoint(weights.config(), views);
  EXPECT_THAT(load_error(), AllOf(HasSubstr("model.safetensors"),
                                  HasSubstr("'model.layers.0.self_attn.q_proj.bias'")));
}

TEST_F(CheckpointIoTest, MissingTensorIsNamedWithTheFile) {
  const LlamaWeights weights = random_weights(tiny_config(false), DType::kF32, accountant_);
  std::vector<SafetensorsTensorView> views = views_of(weights);
  views.erase(views.begin() + 3);  // model.layers.0.self_attn.k_proj.weight
  write_checkpoint(weights.config(), views);
  EXPECT_THAT(load_error(),
              AllOf(HasSubstr((dir_ / "model.safetensors").string()),
                    HasSubstr("missing tensor 'model.layers.0.self_attn.k_proj.weight'")));
}

TEST_F(CheckpointIoTest, UntiedCheckpointWithoutLmHeadIsAnError) {
  const LlamaWeights weights = random_weights(tiny_config(false), DType::kF32, accountant_);
  std::vector<SafetensorsTensorView> views = views_of(weights);
  views.pop_back();  // lm_head.weight
  write_checkpoint(weights.config(), views);
  EXPECT_THAT(load_error(), AllOf(HasSubstr("missing tensor 'lm_head.weight'"),
                                  HasSubstr("tie_word_embeddings is false")));
}

TEST_F(CheckpointIoTest, WrongShapeNamesTensorBothShapesAndFile) {
  const LlamaWeights weights = random_weights(tiny_config(false), DType::kF32, accountant_);
  std::vector<SafetensorsTensorView> views = views_of(weights);
  views[2].shape = {4, 64};  // q_proj is [16, 16]: same bytes, wrong shape
  write_checkpoint(weights.config(), views);
  EXPECT_THAT(load_error(), AllOf(HasSubstr((dir_ / "model.safetensors").string()),
                                  HasSubstr("'model.layers.0.self_attn.q_proj.weight'"),
                                  HasSubstr("has shape [4, 64]"), HasSubstr("implies [16, 16]")));
}

TEST_F(CheckpointIoTest, UnsupportedTensorDtypeIsNamed) {
  const LlamaWeights weights = random_weights(tiny_config(true), DType::kF32, accountant_);
  save_llama_checkpoint(weights, dir_);
  // Rewrite the first tensor's dtype to F64 in place: same header length, so the file stays
  // otherwise well formed.
  std::fstream file(dir_ / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
  std::string head(4096, '\0');
  file.read(head.data(), head.size());
  const size_t at = head.find("\"dtype\":\"F32\"");
  ASSERT_NE(at, std::string::npos);
  file.clear();
  file.seekp(static_cast<std::streamoff>(at + 9));
  file.write("F64", 3);
  file.close();
  EXPECT_THAT(load_error(), AllOf(HasSubstr("model.safetensors"), HasSubstr("'F64'")));
}

TEST_F(CheckpointIoTest, TruncatedWeightFileIsNamed) {
  const LlamaWeights weights = random_weights(tiny_config(true), DType::kF32, accountant_);
  save_llama_checkpoint(weights, dir_);
  fs::resize_file(dir_ / "model.safetensors", fs::file_size(dir_ / "model.safetensors") - 4);
  EXPECT_THAT(load_error(),
              AllOf(HasSubstr((dir_ / "model.safetensors").string()), HasSubstr("truncated")));
}

TEST_F(CheckpointIoTest, MissingDirectoryConfigOrWeightsAreNamed) {
  EXPECT_THAT(load_error(), HasSubstr("not a model directory"));

  fs::create_directories(dir_);
  EXPECT_THAT([&] { load_llama_checkpoint(dir_, DType::kF32, accountant_); },
              ::testing::ThrowsMessage<std::runtime_error>(HasSubstr("config.json")));

  write_text(dir_ / "config.json", llama_config_to_json(tiny_config(true)));
  EXPECT_THAT(load_error(), AllOf(HasSubstr(dir_.string()), HasSubstr("no model.safetensors")));
  write_text(dir_ / "pytorch_model.bin", "");
  EXPECT_THAT(load_error(), HasSubstr("pytorch_model.bin"));
}

TEST_F(CheckpointIoTest, InvalidConfigIsReportedAsInvalidArgument) {
  const LlamaWeights weights = random_weights(tiny_config(true), DType::kF32, accountant_);
  save_llama_checkpoint(weights, dir_);
  json config = read_json(dir_ / "config.json");
  config["model_type"] = "gemma";
  write_text(dir_ / "config.json", config.dump());
  EXPECT_THAT([&] { load_llama_checkpoint(dir_, DType::kF32, accountant_); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  AllOf(HasSubstr("config.json"), HasSubstr("gemma"))));
}

TEST_F(CheckpointIoTest, ConfigThatDisagreesWithTheWeightsIsAShapeError) {
  const LlamaWeights weights = random_weights(tiny_config(true), DType::kF32, accountant_);
  save_llama_checkpoint(weights, dir_);
  LlamaConfig bigger = tiny_config(true);
  bigger.vocab_size = 64;
  write_text(dir_ / "config.json", llama_config_to_json(bigger));
  EXPECT_THAT(load_error(), AllOf(HasSubstr("'model.embed_tokens.weight'"),
                                  HasSubstr("has shape [32, 16]"), HasSubstr("implies [64, 16]")));
}

TEST_F(CheckpointIoTest, IndexWithInvalidJsonIsNamed) {
  save_sharded();
  write_text(dir_ / "model.safetensors.index.json", "{\"weight_map\": {");
  EXPECT_THAT(load_error(),
              AllOf(HasSubstr("model.safetensors.index.json"), HasSubstr("invalid JSON")));
  write_text(dir_ / "model.safetensors.index.json", "{\"metadata\": {\"total_size\": 1e999}}");
  EXPECT_THAT(load_error(), HasSubstr("invalid JSON"));
  write_text(dir_ / "model.safetensors.index.json", "{\"metadata\": {}}");
  EXPECT_THAT(load_error(), HasSubstr("'weight_map' must be an object"));
  write_text(dir_ / "model.safetensors.index.json", "{\"weight_map\": {\"a\": 3}}");
  EXPECT_THAT(load_error(), HasSubstr("weight_map entry for tensor 'a' is not a file name"));
}

TEST_F(CheckpointIoTest, IndexShardPathMayNotEscapeTheDirectory) {
  save_sharded();
  for (const std::string& escape : std::vector<std::string>{
           "../model-00001-of-00002.safetensors", "/etc/passwd", "sub/../../x.safetensors"}) {
    json index = read_json(dir_ / "model.safetensors.index.json");
    index["weight_map"]["model.norm.weight"] = escape;
    write_text(dir_ / "model.safetensors.index.json", index.dump());
    EXPECT_THAT(load_error(), AllOf(HasSubstr("model.safetensors.index.json"),
                                    HasSubstr("'" + escape + "'"), HasSubstr("escapes")));
  }
}

TEST_F(CheckpointIoTest, IndexNamingAMissingShardIsAnError) {
  save_sharded();
  json index = read_json(dir_ / "model.safetensors.index.json");
  index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors";
  write_text(dir_ / "model.safetensors.index.json", index.dump());
  EXPECT_THAT(load_error(),
              AllOf(HasSubstr("model.safetensors.index.json"),
                    HasSubstr("'model-00009-of-00009.safetensors'"), HasSubstr("does not exist")));
}

TEST_F(CheckpointIoTest, IndexAndShardsMustAgree) {
  save_sharded();
  json index = read_json(dir_ / "model.safetensors.index.json");
  const std::string norm_shard = index["weight_map"]["model.norm.weight"];
  const std::string embed_shard = index["weight_map"]["model.embed_tokens.weight"];
  ASSERT_NE(norm_shard, embed_shard);

  // Listed under a shard that does not hold it.
  index["weight_map"]["model.norm.weight"] = embed_shard;
  write_text(dir_ / "model.safetensors.index.json", index.dump());
  EXPECT_THAT(load_error(), AllOf(HasSubstr("'model.norm.weight'"), HasSubstr(embed_shard),
                                  HasSubstr("does not contain it")));

  // Held by a shard but missing from the index: would be silently dropped.
  index["weight_map"].erase("model.norm.weight");
  write_text(dir_ / "model.safetensors.index.json", index.dump());
  EXPECT_THAT(load_error(), AllOf(HasSubstr(norm_shard), HasSubstr("'model.norm.weight'"),
                                  HasSubstr("not listed")));
}

TEST_F(CheckpointIoTest, CorruptShardIsNamed) {
  save_sharded();
  const json index = read_json(dir_ / "model.safetensors.index.json");
  const fs::path shard = dir_ / index["weight_map"]["model.norm.weight"].get<std::string>();
  write_text(shard, "garbage");
  EXPECT_THAT(load_error(), AllOf(HasSubstr(shard.string()), HasSubstr("too short")));
}

// Checkpoints written by transformers' save_pretrained (scripts/make_hf_fixtures.py): the
// transformers 5 field names ("dtype", "rope_parameters"), tied and untied heads, BF16 and F32.
TEST_F(CheckpointIoTest, LoadsCheckpointsWrittenByTransformers) {
  const fs::path fixtures = fs::path(LOMO_TEST_DATA_DIR) / "hf";
  const LlamaWeights tied =
      load_llama_checkpoint(fixtures / "tied_gqa_llama3", DType::kBF16, accountant_);
  const LlamaConfig& c = tied.config();
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.rope_theta, 500.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 16);
  EXPECT_EQ(c.torch_dtype, DType::kF32);
  EXPECT_EQ(tied.parameters().back().name, "model.norm.weight");

  const LlamaWeights untied =
      load_llama_checkpoint(fixtures / "bf16_untied", DType::kBF16, accountant_);
  EXPECT_EQ(untied.config().torch_dtype, DType::kBF16);
  EXPECT_EQ(untied.parameters().back().name, "lm_head.weight");
  // Saving what was loaded in the file's own dtype reproduces the tensors bit for bit.
  save_llama_checkpoint(untied, dir_);
  const SafetensorsFile original =
      SafetensorsFile::open(fixtures / "bf16_untied" / "model.safetensors");
  const SafetensorsFile resaved = SafetensorsFile::open(dir_ / "model.safetensors");
  ASSERT_EQ(original.tensors().size(), resaved.tensors().size());
  for (const SafetensorsTensorInfo& tensor : original.tensors()) {
    std::vector<char> a(tensor.size_bytes()), b(tensor.size_bytes());
    original.read_tensor(tensor.name, a.data());
    resaved.read_tensor(tensor.name, b.data());
    EXPECT_EQ(a, b) << tensor.name;
  }

  EXPECT_NO_THROW(load_llama_checkpoint(fixtures / "untied_mha", DType::kF32, accountant_));
}

// Each family's transformers checkpoint saves back as itself: every tensor (biases included) bit
// for bit, and config.json with every key it had (layer_types, pad_token_id, rope_parameters,
// transformers_version...) unchanged.
TEST_F(CheckpointIoTest, FamilyCheckpointsSaveBackWithEveryTensorAndConfigKey) {
  const fs::path fixtures = fs::path(LOMO_TEST_DATA_DIR) / "hf";
  for (const char* variant : {"llama_bias", "qwen2_tied", "mistral_window", "tied_gqa_llama3"}) {
    SCOPED_TRACE(variant);
    const LlamaWeights loaded = load_llama_checkpoint(fixtures / variant, DType::kF32, accountant_);
    fs::remove_all(dir_);
    save_llama_checkpoint(loaded, dir_);
    EXPECT_EQ(read_json(dir_ / "config.json"), read_json(fixtures / variant / "config.json"));
    const SafetensorsFile original =
        SafetensorsFile::open(fixtures / variant / "model.safetensors");
    const SafetensorsFile resaved = SafetensorsFile::open(dir_ / "model.safetensors");
    ASSERT_EQ(original.tensors().size(), resaved.tensors().size());
    for (const SafetensorsTensorInfo& tensor : original.tensors()) {
      std::vector<char> a(tensor.size_bytes()), b(tensor.size_bytes());
      original.read_tensor(tensor.name, a.data());
      resaved.read_tensor(tensor.name, b.data());
      EXPECT_EQ(a, b) << tensor.name;
    }
  }
}

// A bias the config does not describe is an unknown tensor, and one it describes must be there.
TEST_F(CheckpointIoTest, BiasTensorsMustMatchTheConfig) {
  LlamaConfig config = tiny_config(false);
  config.family = ModelFamily::kQwen2;
  config.qkv_bias = true;
  const LlamaWeights biased = random_weights(config, DType::kF32, accountant_);
  std::vector<SafetensorsTensorView> views = views_of(biased);
  const auto bias = std::find_if(views.begin(), views.end(), [](const SafetensorsTensorView& v) {
    return v.name == "model.layers.1.self_attn.k_proj.bias";
  });
  ASSERT_NE(bias, views.end());
  views.erase(bias);
  write_checkpoint(config, views);
  EXPECT_THAT(load_error(), HasSubstr("missing tensor 'model.layers.1.self_attn.k_proj.bias'"));

  fs::remove_all(dir_);
  write_checkpoint(tiny_config(false), views_of(biased));
  EXPECT_THAT(load_error(), HasSubstr("'model.layers.0.self_attn.k_proj.bias'"));
}

TEST_F(CheckpointIoTest, ZeroShardLimitIsRejected) {
  const LlamaWeights weights = random_weights(tiny_config(true), DType::kF32, accountant_);
  EXPECT_THROW(save_llama_checkpoint(weights, dir_, SaveOptions{.max_shard_bytes = 0}),
               std::invalid_argument);
}

}  // namespace
}  // namespace lomo
