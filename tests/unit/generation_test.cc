// Generation (worker/engine/kv_cache_model.h, worker/generate/): the KV-cache forward against the
// training forward, greedy output against transformers' generate() (tests/data/generation/
// greedy.json, written by scripts/make_generation_fixtures.py from the tests/data/hf models),
// sampling, stop conditions and the `lomo-worker generate` command line.
#include "worker/generate/generation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "common/child_process.h"
#include "worker/data/tokenizer.h"
#include "worker/engine/checkpoint_io.h"
#include "worker/engine/kv_cache_model.h"
#include "worker/engine/llama_model.h"
#include "worker/generate/generate_command.h"
#include "worker/generate/sampler.h"

namespace lomo {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

const fs::path kData = fs::path(LOMO_TEST_DATA_DIR);
const fs::path kHf = kData / "hf";
const std::vector<std::string> kVariants = {"untied_mha", "tied_gqa_llama3", "bf16_untied",
                                            "llama_bias", "qwen2_tied",      "mistral_window"};

nlohmann::json greedy_fixture() {
  std::ifstream in(kData / "generation" / "greedy.json");
  return nlohmann::json::parse(in);
}

// The training forward's logits of one row of tokens, [tokens, vocab].
std::vector<float> full_forward_logits(LlamaWeights& weights, MemoryAccountant& accountant,
                                       const std::vector<int32_t>& tokens) {
  LlamaModel model(weights, accountant);
  TokenBatch batch;
  batch.batch_size = 1;
  batch.seq_len = static_cast<int64_t>(tokens.size());
  batch.input_ids = tokens;
  batch.targets.assign(tokens.size(), kIgnoreIndex);
  model.forward(batch);
  const float* logits = model.logits();
  return {logits, logits + tokens.size() * weights.config().vocab_size};
}

struct CacheCase {
  std::string variant;
  DType storage;
};

void PrintTo(const CacheCase& c, std::ostream* os) {
  *os << c.variant << "/" << dtype_name(c.storage);
}

class KvCacheTest : public ::testing::TestWithParam<CacheCase> {};

// Prefill 6 tokens, then 18 one at a time: every position's logits equal the full forward's.
// 24 tokens run far past mistral_window's 3-token window.
TEST_P(KvCacheTest, LogitsAtEveryPositionEqualTheFullForward) {
  const CacheCase& c = GetParam();
  MemoryAccountant accountant;
  LlamaWeights weights = load_llama_checkpoint(kHf / c.variant, c.storage, accountant);
  const int64_t vocab = weights.config().vocab_size;
  std::vector<int32_t> tokens;
  for (int i = 0; i < 24; ++i) tokens.push_back(static_cast<int32_t>((i * 7 + 3) % vocab));
  const std::vector<float> full = full_forward_logits(weights, accountant, tokens);

  KvCacheModel cached(weights, accountant, static_cast<int64_t>(tokens.size()));
  std::vector<float> incremental = cached.append(std::span(tokens).first(6));
  for (size_t t = 6; t < tokens.size(); ++t) {
    const std::vector<float> row = cached.append(std::span(tokens).subspan(t, 1));
    incremental.insert(incremental.end(), row.begin(), row.end());
  }
  EXPECT_EQ(cached.length(), 24);
  ASSERT_EQ(incremental.size(), full.size());
  // Relative to the row's largest logit: these weights (N(0, 0.5²)) make logits of tens, and a
  // near-zero logit carries the absolute rounding of the whole row.
  double worst = 0.0;
  for (size_t t = 0; t < tokens.size(); ++t) {
    const float* want = full.data() + t * vocab;
    const float* got = incremental.data() + t * vocab;
    double scale = 0.0;
    for (int64_t j = 0; j < vocab; ++j) scale = std::max(scale, std::abs(double(want[j])));
    for (int64_t j = 0; j < vocab; ++j) {
      const double relative = std::abs(double(got[j]) - want[j]) / scale;
      worst = std::max(worst, relative);
      ASSERT_LE(relative, 1e-5) << "position " << t << ", token " << j << ": cached " << got[j]
                                << ", full forward " << want[j] << ", row scale " << scale;
    }
  }
  std::printf("%s: worst difference relative to the row's largest logit %.3g\n", c.variant.c_str(),
              worst);
  RecordProperty("worst_relative_difference", std::to_string(worst));
  EXPECT_GT(accountant.report().current(MemoryKind::kKvCache), 0u)
      << "the cache is counted under its own kind";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, KvCacheTest,
                         ::testing::Values(CacheCase{"untied_mha", DType::kF32},
                                           CacheCase{"tied_gqa_llama3", DType::kF32},
                                           CacheCase{"bf16_untied", DType::kBF16},
                                           CacheCase{"llama_bias", DType::kF32},
                                           CacheCase{"qwen2_tied", DType::kF32},
                                           CacheCase{"mistral_window", DType::kF32}),
                         [](const auto& info) { return info.param.variant; });

TEST(KvCacheTest, RefusesWhatItCannotRun) {
  MemoryAccountant accountant;
  LlamaWeights weights = load_llama_checkpoint(kHf / "untied_mha", DType::kF32, accountant);
  EXPECT_THROW(KvCacheModel(weights, accountant, 0), std::invalid_argument);
  EXPECT_THROW(KvCacheModel(weights, accountant, weights.config().max_position_embeddings + 1),
               std::invalid_argument);
  KvCacheModel model(weights, accountant, 4);
  const std::vector<int32_t> too_many = {1, 2, 3, 4, 5};
  EXPECT_THAT([&] { model.append(too_many); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("capacity 4")));
  const std::vector<int32_t> outside = {1, 37};
  EXPECT_THAT([&] { model.append(outside); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("token 1 = 37")));
  EXPECT_EQ(model.length(), 0);
}

// Greedy decoding equals transformers' greedy generate(), with the model's own eos ids and
// without any (40 tokens), for three prompts on each family's fixture.
TEST(GreedyGeneration, MatchesTransformersGenerate) {
  const nlohmann::json fixture = greedy_fixture();
  ASSERT_EQ(fixture["variants"].size(), kVariants.size());
  for (const std::string& variant : kVariants) {
    MemoryAccountant accountant;
    LlamaWeights weights = load_llama_checkpoint(kHf / variant, DType::kF32, accountant);
    const std::vector<int32_t> eos = model_stop_token_ids(kHf / variant);
    EXPECT_EQ(eos, std::vector<int32_t>{2}) << variant;
    for (const nlohmann::json& run : fixture["variants"][variant]) {
      const std::vector<int32_t> prompt = run["prompt"];
      for (const bool with_eos : {true, false}) {
        GenerationOptions options;
        options.max_new_tokens = fixture["max_new_tokens"];
        if (with_eos) options.stop_token_ids = eos;
        KvCacheModel model(weights, accountant,
                           static_cast<int64_t>(prompt.size()) + options.max_new_tokens);
        const GenerationResult result = generate(model, prompt, options, nullptr);
        const std::vector<int32_t> expected = run[with_eos ? "with_eos" : "no_eos"];
        EXPECT_EQ(result.tokens, expected)
            << variant << ", prompt " << run["prompt"].dump() << (with_eos ? ", eos 2" : "");
        const bool stopped = with_eos && expected.back() == 2;
        EXPECT_EQ(result.stop_reason, stopped ? StopReason::kStopToken : StopReason::kLength);
      }
    }
  }
}

TEST(StopTokens, ComeFromGenerationConfigElseConfig) {
  const fs::path dir = fs::temp_directory_path() / "lomo_generation_test_stop_tokens";
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto write = [&](const char* name, const std::string& text) {
    std::ofstream(dir / name) << text;
  };
  EXPECT_TRUE(model_stop_token_ids(dir).empty());
  write("config.json", R"({"eos_token_id": 7})");
  EXPECT_EQ(model_stop_token_ids(dir), std::vector<int32_t>{7});
  write("generation_config.json", R"({"eos_token_id": [128001, 128009]})");
  EXPECT_EQ(model_stop_token_ids(dir), (std::vector<int32_t>{128001, 128009}));
  write("generation_config.json", R"({"bos_token_id": 1})");
  EXPECT_EQ(model_stop_token_ids(dir), std::vector<int32_t>{7}) << "no key: config.json's";
  write("generation_config.json", R"({"eos_token_id": ["</s>"]})");
  EXPECT_THAT([&] { model_stop_token_ids(dir); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  HasSubstr("generation_config.json: eos_token_id")));
  write("generation_config.json", R"({"eos_token_id": 99999999999})");
  EXPECT_THROW(model_stop_token_ids(dir), std::invalid_argument);
  write("generation_config.json", "{not json");
  EXPECT_THAT([&] { model_stop_token_ids(dir); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("not a JSON object")));
  fs::remove_all(dir);
}

std::vector<int32_t> sample(LlamaWeights& weights, MemoryAccountant& accountant,
                            const SamplingOptions& sampling) {
  GenerationOptions options;
  options.max_new_tokens = 40;
  options.sampling = sampling;
  KvCacheModel model(weights, accountant, 48);
  return generate(model, {13, 23, 31}, options, nullptr).tokens;
}

TEST(SampledGeneration, ASeedAlwaysGivesTheSameTokens) {
  MemoryAccountant accountant;
  LlamaWeights weights = load_llama_checkpoint(kHf / "qwen2_tied", DType::kF32, accountant);
  const SamplingOptions options{.temperature = 1.5, .top_k = 20, .top_p = 0.95, .seed = 7};
  const std::vector<int32_t> first = sample(weights, accountant, options);
  EXPECT_EQ(sample(weights, accountant, options), first);
  SamplingOptions other = options;
  other.seed = 8;
  EXPECT_NE(sample(weights, accountant, other), first) << "40 draws over 20 tokens";
  // top_k 1 leaves only the argmax: sampling becomes greedy whatever the seed.
  const std::vector<int32_t> greedy = sample(weights, accountant, {});
  EXPECT_NE(first, greedy);
  EXPECT_EQ(sample(weights, accountant, {.temperature = 1.0, .top_k = 1, .seed = 3}), greedy);
  EXPECT_EQ(sample(weights, accountant, {.temperature = 1.0, .top_p = 1e-6, .seed = 3}), greedy);
}

TEST(Sampler, DrawsFromTheTemperedDistribution) {
  // softmax([0, ln 3]) = [0.25, 0.75]; at temperature 2, softmax([0, ln 3 / 2]) = [0.366, 0.634].
  const std::vector<float> logits = {0.0f, std::log(3.0f)};
  for (const auto& [temperature, expected] : {std::pair{1.0, 0.75}, std::pair{2.0, 0.634}}) {
    Sampler sampler({.temperature = temperature, .seed = 11});
    int ones = 0;
    const int draws = 20000;
    for (int i = 0; i < draws; ++i) ones += sampler.next(logits);
    EXPECT_NEAR(ones / double(draws), expected, 0.015) << "temperature " << temperature;
  }
  // top_k 2 of [0, 1, 1, 3]: token 3, then tokens 1 and 2 tie for second and both stay; token 0
  // is never drawn.
  Sampler top_k({.temperature = 1.0, .top_k = 2, .seed = 1});
  std::vector<int> counts(4);
  for (int i = 0; i < 4000; ++i) ++counts[top_k.next(std::vector<float>{0, 1, 1, 3})];
  EXPECT_EQ(counts[0], 0);
  EXPECT_GT(counts[1], 0);
  EXPECT_GT(counts[2], 0);
}

TEST(Sampler, RefusesBadOptions) {
  EXPECT_THAT([] { Sampler({.temperature = -0.5}); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("temperature")));
  EXPECT_THAT([] { Sampler({.top_k = -1}); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("top_k")));
  EXPECT_THAT([] { Sampler({.top_p = 0.0}); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("top_p")));
  EXPECT_THAT([] { Sampler({.top_p = 1.5}); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("top_p")));
}

// ---- The command line --------------------------------------------------------------------------

struct CommandResult {
  int code;
  std::string out, err;
};

CommandResult run_generate(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  const int code = generate_command(args, out, err);
  return {code, out.str(), err.str()};
}

TEST(GenerateCommand, PrintsTransformersGreedyTokensAsJson) {
  const nlohmann::json run = greedy_fixture()["variants"]["mistral_window"][0];
  std::string ids;
  for (int id : run["prompt"]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const CommandResult r = run_generate({"--model", (kHf / "mistral_window").string(),
                                        "--prompt-ids", ids, "--max-new-tokens", "40", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json json = nlohmann::json::parse(r.out);
  EXPECT_EQ(json["tokens"], run["with_eos"]);
  EXPECT_EQ(json["promptTokens"], run["prompt"]);
  EXPECT_FALSE(json.contains("text")) << "the fixture has no tokenizer";
}

// The whole text path against transformers: the prompt tokenized, greedy generation, the new
// tokens decoded (tests/data/generation/qwen2_text: a Qwen2 model over the qwen2_style tokenizer).
TEST(GenerateCommand, TextPromptsMatchTransformersAndTokenizers) {
  const fs::path dir = kData / "generation" / "qwen2_text";
  std::ifstream in(dir / "expected.json");
  const nlohmann::json expected = nlohmann::json::parse(in);
  ASSERT_EQ(expected["runs"].size(), 3u);
  for (const nlohmann::json& run : expected["runs"]) {
    const CommandResult r =
        run_generate({"--model", dir.string(), "--prompt", run["prompt"], "--max-new-tokens",
                      std::to_string(expected["max_new_tokens"].get<int>()), "--json"});
    ASSERT_EQ(r.code, 0) << r.err;
    const nlohmann::json json = nlohmann::json::parse(r.out);
    EXPECT_EQ(json["promptTokens"], run["prompt_ids"]) << run["prompt"];
    EXPECT_EQ(json["tokens"], run["tokens"]) << run["prompt"];
    EXPECT_EQ(json["text"], run["text"]) << run["prompt"];
    const bool stopped = run["tokens"].back() == expected["eos_token_id"];
    EXPECT_EQ(json["stopReason"], stopped ? "stop_token" : "length");
  }
}

// Chat mode with the model's own template: tests/data/generation/qwen2_chat holds the qwen2_style
// tokenizer with Qwen2.5's chat_template; expected.json has the prompt transformers'
// apply_chat_template(add_generation_prompt=True) renders and tokenizes, and the qwen2_text
// model's greedy continuation of it (scripts/make_generation_fixtures.py).
// Runs `lomo-worker generate --chat` with `tokenizer` on the qwen2_text model for each chat of
// the tokenizer directory's expected.json and compares with transformers' runs there.
nlohmann::json expect_chat_runs_as_transformers(const fs::path& model, const fs::path& tokenizer) {
  std::ifstream in(tokenizer / "expected.json");
  nlohmann::json expected = nlohmann::json::parse(in);
  EXPECT_EQ(expected["runs"].size(), 2u);
  for (const nlohmann::json& run : expected["runs"]) {
    std::vector<std::string> args = {"--model", model.string(), "--tokenizer", tokenizer.string(),
                                     "--chat",  "--prompt",     run["prompt"], "--max-new-tokens",
                                     "24",      "--json"};
    if (!run["system"].get<std::string>().empty()) {
      args.insert(args.end(), {"--system", run["system"]});
    }
    const CommandResult r = run_generate(args);
    EXPECT_EQ(r.code, 0) << r.err;
    if (r.code != 0) continue;
    EXPECT_EQ(r.err, "") << "the template is there: no fallback note";
    const nlohmann::json json = nlohmann::json::parse(r.out);
    EXPECT_EQ(json["promptTokens"], run["prompt_ids"]) << run["prompt_text"];
    EXPECT_EQ(json["tokens"], run["tokens"]) << run["prompt"];
    EXPECT_EQ(json["text"], run["text"]) << run["prompt"];
  }
  return expected;
}

TEST(GenerateCommand, ChatModeRendersTheModelsOwnTemplateAsTransformersDoes) {
  const fs::path model = kData / "generation" / "qwen2_text";
  const fs::path tokenizer = kData / "generation" / "qwen2_chat";
  const nlohmann::json expected = expect_chat_runs_as_transformers(model, tokenizer);
  ASSERT_EQ(expected["runs"].size(), 2u);
  // Qwen2.5's template adds its default system message; the built-in chatml one, named, does not.
  const nlohmann::json& first = expected["runs"][0];
  const CommandResult builtin = run_generate(
      {"--model", model.string(), "--tokenizer", tokenizer.string(), "--chat", "--chat-template",
       "chatml", "--prompt", first["prompt"], "--max-new-tokens", "1", "--json"});
  ASSERT_EQ(builtin.code, 0) << builtin.err;
  const std::vector<int32_t> builtin_prompt = nlohmann::json::parse(builtin.out)["promptTokens"];
  EXPECT_LT(builtin_prompt.size(), first["prompt_ids"].size());
  const CommandResult named_auto = run_generate(
      {"--model", model.string(), "--tokenizer", tokenizer.string(), "--chat", "--chat-template",
       "auto", "--prompt", first["prompt"], "--max-new-tokens", "1", "--json"});
  ASSERT_EQ(named_auto.code, 0) << named_auto.err;
  EXPECT_EQ(nlohmann::json::parse(named_auto.out)["promptTokens"], first["prompt_ids"]);
}

// The same with a SentencePiece-style tokenizer.json alone (tests/data/generation/sp_chat:
// Metaspace, byte fallback, Mistral's template): the prompt as transformers renders and tokenizes
// it ("<s>" a token, not text), its greedy continuation, and the text as tokenizers decodes it
// (byte tokens joined, U+FFFD for bytes that are not UTF-8).
TEST(GenerateCommand, ChatModeWithASentencePieceStyleTokenizerMatchesTransformers) {
  expect_chat_runs_as_transformers(kData / "generation" / "qwen2_text",
                                   kData / "generation" / "sp_chat");
}

// Without a chat_template the built-in template that fits the tokens is used, and said.
TEST(GenerateCommand, ChatModeWithoutATemplateSaysWhichBuiltInItUses) {
  const fs::path model = kData / "generation" / "qwen2_text";
  const CommandResult r = run_generate(
      {"--model", model.string(), "--chat", "--prompt", "hi", "--max-new-tokens", "1", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr((model / "tokenizer_config.json").string() +
                               " has no chat_template; using the built-in chatml template"));
}

// A template outside the Jinja subset fails the command, naming the file and the position.
TEST(GenerateCommand, ABrokenChatTemplateNamesItsFile) {
  const fs::path dir =
      fs::temp_directory_path() / ("lomo_generation_bad_template_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(kData / "generation" / "qwen2_chat" / "tokenizer.json", dir / "tokenizer.json");
  std::ofstream(dir / "tokenizer_config.json")
      << R"({"eos_token": "<|im_end|>", "chat_template": "{% for m in messages %}{{ m.content }}"})";
  const CommandResult r =
      run_generate({"--model", (kData / "generation" / "qwen2_text").string(), "--tokenizer",
                    dir.string(), "--chat", "--prompt", "hi", "--max-new-tokens", "1"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr((dir / "tokenizer_config.json").string() + " chat_template"));
  fs::remove_all(dir);
}

// A model trained with the spec's `tokenizer.kind: bytes` (the tiny demo models) has no tokenizer
// files: `--tokenizer bytes` encodes the prompt as its bytes and decodes the new tokens the same
// way.
TEST(GenerateCommand, TheBytesTokenizerServesModelsTrainedWithIt) {
  const fs::path dir =
      fs::temp_directory_path() / ("lomo_generation_bytes_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  ChildOptions init;
  init.argv = {LOMO_WORKER_BIN, "init-model", dir.string()};
  init.stdout_mode = ChildOutput::kPipe;
  ChildProcess child(init);
  ASSERT_TRUE(child.wait().success());
  const CommandResult r = run_generate({"--model", dir.string(), "--tokenizer", "bytes", "--prompt",
                                        "lomo", "--max-new-tokens", "4", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json json = nlohmann::json::parse(r.out);
  EXPECT_EQ(json["promptTokens"], nlohmann::json::array({'l', 'o', 'm', 'o'}));
  ASSERT_EQ(json["tokens"].size(), 4u);
  EXPECT_TRUE(json.contains("text"));
  const CommandResult without = run_generate({"--model", dir.string(), "--prompt", "lomo"});
  EXPECT_NE(without.code, 0);
  EXPECT_THAT(without.err, ::testing::HasSubstr("--tokenizer bytes"));
  fs::remove_all(dir);
}

TEST(GenerateCommand, BadArgumentsSayWhatIsWrong) {
  const std::string model = (kHf / "untied_mha").string();
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--prompt-ids", "1,2"}, "--model DIR is required"},
      {{"--model", model}, "exactly one of --prompt, --prompt-file and --prompt-ids"},
      {{"--model", model, "--prompt", "a", "--prompt-ids", "1"}, "exactly one of"},
      {{"--model", model, "--prompt-ids", "1,x"}, "--prompt-ids: expected token ids"},
      {{"--model", model, "--prompt-ids", "1", "--temperature", "-1"}, "temperature must be"},
      {{"--model", model, "--prompt-ids", "1", "--top-p", "0"}, "top_p must be in (0, 1]"},
      {{"--model", model, "--prompt-ids", "1", "--top-k", "two"}, "--top-k"},
      {{"--model", model, "--prompt-ids", "1", "--max-new-tokens", "0"}, "--max-new-tokens"},
      {{"--model", model, "--prompt-ids", "1", "--bogus", "1"}, "--bogus"},
      {{"--model", model, "--prompt-ids", "1", "--system", "s"}, "need --chat"},
      {{"--model", model, "--prompt", "hi", "--chat", "--chat-template", "x"}, "--chat-template"},
      {{"--model", model, "--prompt", "hi"}, "has no tokenizer.json or tokenizer.model"},
      {{"--model", model, "--prompt-ids", "1", "--stop", "x"}, "has no tokenizer"},
      {{"--model", model, "--prompt-ids", "1,2", "--max-new-tokens", "64"},
       "exceed the model's max_position_embeddings 64"},
  };
  for (const auto& [args, message] : cases) {
    const CommandResult r = run_generate(args);
    EXPECT_EQ(r.code, 2) << ::testing::PrintToString(args) << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr(message)) << ::testing::PrintToString(args);
  }
  const CommandResult missing =
      run_generate({"--model", "/nonexistent/model", "--prompt-ids", "1"});
  EXPECT_EQ(missing.code, 1);
  EXPECT_THAT(missing.err, HasSubstr("/nonexistent/model"));
  const CommandResult help = run_generate({"--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_THAT(help.out, HasSubstr("lomo-worker generate --model DIR"));
}

// A random model on the qwen2_style tokenizer (ChatML tokens), saved as a model directory.
class GenerateWithTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lomo_generation_test_" +
            std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    for (const char* file : {"tokenizer.json", "tokenizer_config.json"}) {
      fs::copy_file(kData / "tokenizers" / "qwen2_style" / file, dir_ / file);
    }
    tokenizer_ = load_tokenizer(dir_);
    LlamaConfig config;
    config.vocab_size = tokenizer_->vocab_size();
    config.hidden_size = 32;
    config.intermediate_size = 48;
    config.num_hidden_layers = 2;
    config.num_attention_heads = 4;
    config.num_key_value_heads = 2;
    config.head_dim = 8;
    config.max_position_embeddings = 128;
    config.eos_token_id = *tokenizer_->token_to_id("<|endoftext|>");
    MemoryAccountant accountant;
    LlamaWeights weights(config, DType::kF32, accountant);
    weights.init_random(5, 0.5f);
    save_llama_checkpoint(weights, dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

TEST_F(GenerateWithTokenizerTest, ChatModeUsesTheTemplateAndEndsAtTheEndOfTheTurn) {
  const CommandResult r =
      run_generate({"--model", dir_.string(), "--prompt", "hello there", "--chat", "--system",
                    "be brief", "--max-new-tokens", "30", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const nlohmann::json json = nlohmann::json::parse(r.out);
  const int32_t im_start = *tokenizer_->token_to_id("<|im_start|>");
  const int32_t im_end = *tokenizer_->token_to_id("<|im_end|>");
  std::vector<int32_t> expected;
  auto text = [&](const std::string& s) {
    for (int32_t id : tokenizer_->encode(s)) expected.push_back(id);
  };
  expected.push_back(im_start);
  text("system\n");
  text("be brief");
  expected.push_back(im_end);
  text("\n");
  expected.push_back(im_start);
  text("user\n");
  text("hello there");
  expected.push_back(im_end);
  text("\n");
  expected.push_back(im_start);
  text("assistant\n");
  EXPECT_EQ(json["promptTokens"].get<std::vector<int32_t>>(), expected);
  const std::vector<int32_t> tokens = json["tokens"];
  ASSERT_FALSE(tokens.empty());
  const std::string reason = json["stopReason"];
  if (reason == "stop_token") {
    EXPECT_TRUE(tokens.back() == im_end || tokens.back() == 600) << tokens.back();
  } else {
    EXPECT_EQ(reason, "length");
    EXPECT_EQ(tokens.size(), 30u);
  }
  EXPECT_EQ(json["text"], tokenizer_->decode(tokens));
}

TEST_F(GenerateWithTokenizerTest, StopStringsCutTheTextAndEndTheRun) {
  const std::vector<std::string> base = {"--model",          dir_.string(), "--prompt", "once upon",
                                         "--max-new-tokens", "30",          "--json"};
  const CommandResult full = run_generate(base);
  ASSERT_EQ(full.code, 0) << full.err;
  const nlohmann::json all = nlohmann::json::parse(full.out);
  const std::string text = all["text"];
  const std::vector<int32_t> all_tokens = all["tokens"];
  ASSERT_GE(all_tokens.size(), 6u) << "the random model ended early: pick another seed";
  // A stop string made of the text of tokens 3 and 4.
  const std::string before =
      tokenizer_->decode(std::vector<int32_t>(all_tokens.begin(), all_tokens.begin() + 3));
  const std::string stop =
      tokenizer_->decode(std::vector<int32_t>(all_tokens.begin(), all_tokens.begin() + 5))
          .substr(before.size());
  ASSERT_FALSE(stop.empty());
  std::vector<std::string> args = base;
  args.insert(args.end(), {"--stop", "no such text", "--stop", stop});
  const CommandResult cut = run_generate(args);
  ASSERT_EQ(cut.code, 0) << cut.err;
  const nlohmann::json json = nlohmann::json::parse(cut.out);
  EXPECT_EQ(json["stopReason"], "stop_string");
  EXPECT_EQ(json["text"], text.substr(0, text.find(stop)));
  const std::vector<int32_t> tokens = json["tokens"];
  EXPECT_LE(tokens.size(), 5u);
  EXPECT_TRUE(std::equal(tokens.begin(), tokens.end(), all_tokens.begin()))
      << "the same greedy run, ended early";
  // Plain text output: the text and a newline.
  std::vector<std::string> plain = args;
  plain.erase(std::find(plain.begin(), plain.end(), "--json"));
  EXPECT_EQ(run_generate(plain).out, text.substr(0, text.find(stop)) + "\n");
}

// ---- lomoctl generate: the real binaries -----------------------------------------------------

std::string read_all(int fd) {
  std::string text;
  char buffer[4096];
  ssize_t n;
  while ((n = ::read(fd, buffer, sizeof(buffer))) > 0) text.append(buffer, static_cast<size_t>(n));
  return text;
}

// Runs lomoctl with `args`, lomo-worker named through $LOMO_WORKER_BIN. Small outputs: the pipes
// hold them until the process has ended.
CommandResult run_lomoctl(const std::vector<std::string>& args) {
  ChildOptions options;
  options.argv = {LOMO_LOMOCTL_BIN};
  options.argv.insert(options.argv.end(), args.begin(), args.end());
  options.env = {std::string("LOMO_WORKER_BIN=") + LOMO_WORKER_BIN};
  options.stdout_mode = ChildOutput::kPipe;
  options.stderr_mode = ChildOutput::kPipe;
  ChildProcess child(options);
  const ExitStatus status = child.wait();
  EXPECT_FALSE(status.signaled) << status.describe();
  return {status.code, read_all(child.stdout_fd()), read_all(child.stderr_fd())};
}

TEST(LomoctlGenerate, RunsLomoWorkerGenerateOnACheckpointDirectory) {
  const nlohmann::json run = greedy_fixture()["variants"]["llama_bias"][1];
  std::string ids;
  for (int id : run["prompt"]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  const CommandResult r =
      run_lomoctl({"--output", "json", "generate", (kHf / "llama_bias").string(), "--prompt-ids",
                   ids, "--max-new-tokens", "40"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["tokens"], run["with_eos"]);
  // Text output: the ids, space separated (the fixture has no tokenizer).
  const CommandResult text = run_lomoctl(
      {"generate", (kHf / "llama_bias").string(), "--prompt-ids", ids, "--max-new-tokens", "3"});
  ASSERT_EQ(text.code, 0) << text.err;
  const std::vector<int32_t> first = run["with_eos"];
  EXPECT_EQ(text.out, std::to_string(first[0]) + " " + std::to_string(first[1]) + " " +
                          std::to_string(first[2]) + "\n");
}

TEST(LomoctlGenerate, ProblemsExitWithLomoctlsErrorCode) {
  const CommandResult no_dir = run_lomoctl({"generate"});
  EXPECT_EQ(no_dir.code, 3);
  EXPECT_THAT(no_dir.err, HasSubstr("generate needs CHECKPOINT_DIR"));
  const CommandResult not_model = run_lomoctl({"generate", kData.string(), "--prompt", "x"});
  EXPECT_EQ(not_model.code, 3);
  EXPECT_THAT(not_model.err, HasSubstr("is not a model directory (it has no config.json)"));
  const CommandResult bad_flag =
      run_lomoctl({"generate", (kHf / "llama_bias").string(), "--prompt-ids", "1", "--top-p", "2"});
  EXPECT_EQ(bad_flag.code, 3);
  EXPECT_THAT(bad_flag.err, HasSubstr("top_p must be in (0, 1]"));
}

}  // namespace
}  // namespace lomo
