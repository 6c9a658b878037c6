#include "worker/data/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "worker/data/bpe_tokenizer.h"
#include "worker/data/normalizer.h"
#include "worker/data/sentencepiece_tokenizer.h"
#include "worker/data/split_pattern.h"
#include "worker/data/unicode_text.h"

namespace lomo {
namespace {

using nlohmann::json;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

namespace fs = std::filesystem;

const fs::path kTokenizerData = fs::path(LOMO_TEST_DATA_DIR) / "tokenizers";
const fs::path kLlama2Model = LOMO_LLAMA2_TOKENIZER_MODEL;

std::string read_text(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path.string());
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A fresh directory under the system temp dir, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("lomo_tokenizer_test_" + std::to_string(::getpid()) + "_" + std::to_string(next_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  static inline int next_ = 0;
  fs::path path_;
};

// Runs `load` and returns the message of the exception of type E it throws; fails if it throws
// nothing or something else.
template <typename E>
std::string error_of(const std::function<void()>& load) {
  try {
    load();
  } catch (const E& error) {
    return error.what();
  } catch (const std::exception& error) {
    ADD_FAILURE() << "wrong exception type: " << error.what();
    return {};
  }
  ADD_FAILURE() << "no exception";
  return {};
}

std::string escaped(const std::string& text) { return json(text).dump(); }

// ---------------------------------------------------------------------------------------------
// Parity with Hugging Face tokenizers on the committed vectors
// (scripts/make_tokenizer_vectors.py).

class BpeParityTest : public ::testing::TestWithParam<const char*> {};

TEST_P(BpeParityTest, EveryVectorEncodesToTheLibrarysIdsAndDecodesBack) {
  const fs::path dir = kTokenizerData / GetParam();
  const std::unique_ptr<Tokenizer> tokenizer = load_tokenizer(dir);
  const json vectors = json::parse(read_text(dir / "vectors.json"));
  ASSERT_GT(vectors.at("vectors").size(), 100u);
  size_t mismatches = 0;
  for (const json& vector : vectors.at("vectors")) {
    const std::string text = vector.at("text").get<std::string>();
    const std::vector<int32_t> expected = vector.at("ids").get<std::vector<int32_t>>();
    const std::vector<int32_t> ids = tokenizer->encode(text);
    if (ids != expected) ++mismatches;
    EXPECT_EQ(ids, expected) << "text " << escaped(text);
    // Decoding returns the text, except where an lstrip/rstrip token absorbed whitespace.
    const std::string decoded = vector.value("decoded", text);
    EXPECT_EQ(tokenizer->decode(expected), decoded) << "ids of " << escaped(text);
    if (mismatches > 20) FAIL() << "stopping after 20 mismatches";
  }
}

INSTANTIATE_TEST_SUITE_P(Styles, BpeParityTest,
                         ::testing::Values("llama3_style", "gpt2_style", "qwen2_style",
                                           "o200k_style", "normalized_style", "behaviors_style",
                                           "byte_fallback_style", "sp_legacy_style",
                                           "metaspace_first_style", "metaspace_always_style",
                                           "metaspace_never_style"));

TEST(BpeTokenizerTest, SpecialTokenIdsComeFromTokenizerConfig) {
  // llama3_style: strings; gpt2_style: {"content": ...} objects; qwen2_style: null BOS.
  const auto llama3 = load_tokenizer(kTokenizerData / "llama3_style");
  EXPECT_EQ(llama3->bos_id(), 1002);  // <|begin_of_text|>
  EXPECT_EQ(llama3->eos_id(), 1006);  // <|eot_id|>
  EXPECT_EQ(llama3->pad_id(), std::nullopt);
  EXPECT_EQ(llama3->token_to_id("<|eot_id|>"), 1006);
  EXPECT_EQ(llama3->token_to_id("<think>"), 1007);
  EXPECT_EQ(llama3->token_to_id("Hello"), std::nullopt);
  EXPECT_EQ(llama3->vocab_size(), 1008);

  const auto gpt2 = load_tokenizer(kTokenizerData / "gpt2_style");
  EXPECT_EQ(gpt2->bos_id(), 0);  // <|endoftext|>, also in model.vocab
  EXPECT_EQ(gpt2->eos_id(), 0);
  EXPECT_EQ(gpt2->vocab_size(), 1003);

  const auto qwen2 = load_tokenizer(kTokenizerData / "qwen2_style");
  EXPECT_EQ(qwen2->bos_id(), std::nullopt);
  EXPECT_EQ(qwen2->eos_id(), 602);  // <|im_end|>
  EXPECT_EQ(qwen2->pad_id(), 600);  // <|endoftext|>
}

TEST(BpeTokenizerTest, SpecialTokensInTheMiddleOfTextAreSingleIds) {
  const auto tokenizer = load_tokenizer(kTokenizerData / "llama3_style");
  const std::vector<int32_t> ids = tokenizer->encode("a<|eot_id|>b");
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[1], 1006);
  EXPECT_EQ(tokenizer->decode(ids), "a<|eot_id|>b");
}

TEST(BpeTokenizerTest, IdsWithoutATokenDecodeToNothing) {
  const auto tokenizer = load_tokenizer(kTokenizerData / "llama3_style");
  std::vector<int32_t> ids = tokenizer->encode("Hello");
  ids.insert(ids.begin(), -1);
  ids.push_back(1 << 30);
  EXPECT_EQ(tokenizer->decode(ids), "Hello");
}

TEST(BpeTokenizerTest, InvalidUtf8IsEncodedByteByByteAndDecodedAsReplacementCharacters) {
  // The tokenizers library refuses such text; lomo keeps every byte as a byte token.
  const auto tokenizer = load_tokenizer(kTokenizerData / "llama3_style");
  const std::vector<int32_t> ids = tokenizer->encode("a\xff\xfe b\xe2\x82");
  EXPECT_FALSE(ids.empty());
  EXPECT_EQ(tokenizer->decode(ids), "a\xEF\xBF\xBD\xEF\xBF\xBD b\xEF\xBF\xBD");
}

TEST(BpeTokenizerTest, InvalidUtf8InSentencePieceStyleTextBecomesByteTokens) {
  // Each ill-formed byte is a character of its own with no piece: its <0xXX> token. ByteFallback
  // decodes a run of byte tokens that is not UTF-8 as one U+FFFD per byte, as the library does.
  const auto tokenizer = load_tokenizer(kTokenizerData / "sp_legacy_style");
  const std::vector<int32_t> ids = tokenizer->encode("a\xff\xe2\x82 b");
  const int32_t ff = tokenizer->token_to_id("<0xFF>").value();
  const int32_t e2 = tokenizer->token_to_id("<0xE2>").value();
  const int32_t x82 = tokenizer->token_to_id("<0x82>").value();
  const std::vector<int32_t> bytes = {ff, e2, x82};
  EXPECT_NE(std::search(ids.begin(), ids.end(), bytes.begin(), bytes.end()), ids.end());
  EXPECT_EQ(tokenizer->decode(ids), "a\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD b");
}

TEST(BpeTokenizerTest, ConcurrentEncodesAgree) {
  const auto tokenizer = load_tokenizer(kTokenizerData / "gpt2_style");
  const std::string text = "Concurrent encoding, 12345 times: ça marche! 中文 😀\n";
  const std::vector<int32_t> expected = tokenizer->encode(text);
  std::vector<std::thread> threads;
  std::vector<int> agreed(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) agreed[t] += tokenizer->encode(text) == expected;
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_THAT(agreed, ElementsAre(200, 200, 200, 200));
}

// ---------------------------------------------------------------------------------------------
// Split patterns and UTF-8 helpers.

constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The matches of `pattern` in `text`, as strings.
std::vector<std::string_view> matches(std::string_view pattern, std::string_view text) {
  std::vector<ByteRange> ranges;
  TokenizerRegex(pattern).find_all(text, ranges);
  std::vector<std::string_view> out;
  for (const auto& [start, stop] : ranges) out.push_back(text.substr(start, stop - start));
  return out;
}

TEST(SplitPatternTest, Llama3SplitsDigitsInThreesAndQwen2OneByOne) {
  EXPECT_THAT(matches(kLlama3Pattern, "1234567"), ElementsAre("123", "456", "7"));
  EXPECT_THAT(matches(kQwen2Pattern, "123"), ElementsAre("1", "2", "3"));
  EXPECT_THAT(matches(kGpt2SplitPattern, "x 1234567"), ElementsAre("x", " 1234567"));
}

TEST(SplitPatternTest, WhitespaceBeforeAWordLeavesItsLastSpaceToTheWord) {
  EXPECT_THAT(matches(kGpt2SplitPattern, "a   b"), ElementsAre("a", "  ", " b"));
  EXPECT_THAT(matches(kLlama3Pattern, "a  \n\n  b"), ElementsAre("a", "  \n\n", " ", " b"));
  EXPECT_THAT(matches(kLlama3Pattern, "x\t\tfoo  "), ElementsAre("x", "\t", "\tfoo", "  "));
}

TEST(SplitPatternTest, Llama3ContractionsIgnoreCaseIncludingLongS) {
  // Oniguruma's case folding maps U+017F (ſ) to 's'; the tokenizers library agrees.
  EXPECT_THAT(matches(kLlama3Pattern, "IT'S 'ſx"), ElementsAre("IT", "'S", " '", "ſx"));
  EXPECT_THAT(matches(kLlama3Pattern, "'ſx"), ElementsAre("'ſ", "x"));
  EXPECT_THAT(matches(kGpt2SplitPattern, "IT'S it's"), ElementsAre("IT", "'", "S", " it", "'s"));
}

TEST(SplitPatternTest, EmptyMatchesAdvanceOneCharacterAsTheOnigCrateDoes) {
  // \b matches empty at each word boundary; a match right after the previous one is skipped.
  std::vector<ByteRange> ranges;
  TokenizerRegex(R"(\b)").find_all("ab cd", ranges);
  EXPECT_THAT(ranges,
              ElementsAre(ByteRange{0, 0}, ByteRange{2, 2}, ByteRange{3, 3}, ByteRange{5, 5}));
  TokenizerRegex("x*").find_all("axx\xC3\xA9", ranges);
  EXPECT_THAT(ranges, ElementsAre(ByteRange{0, 0}, ByteRange{1, 3}, ByteRange{5, 5}));
}

TEST(SplitPatternTest, IllFormedBytesAreOneCharacterOfClassOther) {
  // Neither letter, number nor space: punctuation-like, as the hand-written scanners had it.
  EXPECT_THAT(matches(kGpt2SplitPattern, "a\xFF\xFE b!\xE2\x82"),
              ElementsAre("a", "\xFF\xFE", " b", "!\xE2\x82"));
  EXPECT_THAT(matches(".", "\xC3\xA9\xFF"), ElementsAre("\xC3\xA9", "\xFF"));
}

TEST(SplitPatternTest, LiteralPatternsMatchTheirTextExactly) {
  EXPECT_THAT(matches(TokenizerRegex::literal("a.b*")->pattern(), "a.b* axb a.b*"),
              ElementsAre("a.b*", "a.b*"));
}

TEST(SplitPatternTest, ABadPatternIsAnErrorQuotingIt) {
  EXPECT_THAT(error_of<std::invalid_argument>([] { TokenizerRegex("(a"); }),
              AllOf(HasSubstr("\"(a\""), HasSubstr("does not compile")));
}

TEST(NormalizerTest, FormsCaseReplaceAndPrependInOrder) {
  using Kind = NormalizerStep::Kind;
  EXPECT_EQ(normalize({{Kind::kNfc, nullptr, {}}}, "e\xCC\x81"), "\xC3\xA9");  // é composed
  EXPECT_EQ(normalize({{Kind::kNfd, nullptr, {}}}, "\xC3\xA9"), "e\xCC\x81");
  EXPECT_EQ(normalize({{Kind::kNfkc, nullptr, {}}}, "\xEF\xAC\x81"), "fi");  // ﬁ ligature
  EXPECT_EQ(normalize({{Kind::kLowercase, nullptr, {}}}, "AB\xC4\xB0"), "abi\xCC\x87");  // İ
  const std::vector<NormalizerStep> steps = {
      {Kind::kReplace, std::make_shared<TokenizerRegex>(" +"), "_"},
      {Kind::kPrepend, nullptr, ">"},
  };
  EXPECT_EQ(normalize(steps, "a  b c"), ">a_b_c");
  EXPECT_EQ(normalize(steps, ""), "");  // Prepend leaves empty text empty
}

TEST(NormalizerTest, IllFormedBytesPassThroughBetweenNormalizedRuns) {
  using Kind = NormalizerStep::Kind;
  EXPECT_EQ(normalize({{Kind::kNfkc, nullptr, {}}, {Kind::kLowercase, nullptr, {}}},
                      "\xEF\xAC\x81X\xFF"
                      "e\xCC\x81\xE2\x82"),
            "fix\xFF\xC3\xA9\xE2\x82");
}

TEST(Utf8Test, LossyDecodingReplacesEachMaximalIllFormedSubpart) {
  // The cases follow Rust's String::from_utf8_lossy, which the tokenizers library's decoder uses.
  EXPECT_EQ(utf8_lossy("ok \xC3\xA9"), "ok \xC3\xA9");
  EXPECT_EQ(utf8_lossy("\xE2\x82"), "\xEF\xBF\xBD");                              // truncated: one
  EXPECT_EQ(utf8_lossy("\xE2\x82x"), "\xEF\xBF\xBDx");                            // cut short: one
  EXPECT_EQ(utf8_lossy("\xF0\x80\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
  EXPECT_EQ(utf8_lossy("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(Utf8Test, OnigurumaClassesAreTheOnesTheTablesHad) {
  // The cases the removed hand-written tables were checked with, now asked of Oniguruma.
  const auto is = [](std::string_view cls, std::string_view text) {
    return matches(std::string(cls) + "+", text) == std::vector<std::string_view>{text};
  };
  EXPECT_TRUE(is(R"(\p{L})", "a中"));
  EXPECT_TRUE(is(R"(\p{N})", "٣Ⅷ²"));
  EXPECT_TRUE(is(R"(\s)", "\xC2\x85\xE3\x80\x80"));  // NEL, ideographic space
  for (const char* other : {"\xE2\x80\x8B", "\xCC\x81", "\xF0\x9F\x98\x80"}) {
    EXPECT_TRUE(is(R"([^\s\p{L}\p{N}])", other)) << escaped(other);  // ZWSP, U+0301, 😀
  }
}

TEST(Utf8Test, WhiteSpaceIsUnicodesProperty) {
  for (const uint32_t space : {0x09u, 0x0Du, 0x20u, 0x85u, 0xA0u, 0x1680u, 0x2000u, 0x200Au,
                               0x2028u, 0x2029u, 0x202Fu, 0x205Fu, 0x3000u}) {
    EXPECT_TRUE(is_white_space(space)) << space;
  }
  for (const uint32_t other : {0x08u, 0x0Eu, 0x200Bu, 0x180Eu, 0xFEFFu, kInvalidCodePoint}) {
    EXPECT_FALSE(is_white_space(other)) << other;
  }
}

// ---------------------------------------------------------------------------------------------
// SentencePiece: the Llama 2 tokenizer.

class SentencePieceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(kLlama2Model))
        << kLlama2Model << " is missing from the repository (tests/data/llama2_tokenizer)";
    tokenizer_ = SentencePieceTokenizer::load(kLlama2Model);
  }
  std::unique_ptr<SentencePieceTokenizer> tokenizer_;
};

TEST_F(SentencePieceTest, EncodesLikeTheSentencePieceLibrary) {
  // Expected ids from the sentencepiece Python package 0.2.3 on the same file. Note the leading
  // "▁" (add_dummy_prefix): "Hello" is "▁Hello" (15043), and " leading" gets "▁" + "▁leading".
  const std::vector<std::pair<std::string, std::vector<int32_t>>> cases = {
      {"Hello", {15043}},
      {"Hello world", {15043, 3186}},
      {"Hello, world! It's 2024.",
       {15043, 29892, 3186, 29991, 739, 29915, 29879, 29871, 29906, 29900, 29906, 29946, 29889}},
      {" leading space", {29871, 8236, 2913}},
      {"The quick brown fox jumps over the lazy dog.",
       {450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889}},
      {"café naïve Zürich", {274, 28059, 1055, 30085, 345, 24931}},
      {"中文测试", {29871, 30275, 30333, 31851, 31787}},
      {"😀", {29871, 243, 162, 155, 131}},  // byte fallback
      {"  two\n\nlines\ttab", {259, 1023, 13, 13, 9012, 12, 3891}},
      {"12345", {29871, 29896, 29906, 29941, 29946, 29945}},
      {"", {}},
  };
  for (const auto& [text, ids] : cases) {
    EXPECT_EQ(tokenizer_->encode(text), ids) << escaped(text);
    EXPECT_EQ(tokenizer_->decode(ids), text) << escaped(text);
  }
}

// tests/data/llama2_tokenizer/special_text_vectors.json (scripts/make_sentencepiece_vectors.py):
// what transformers' tokenizer for a directory holding only this tokenizer.model gives texts with
// "<s>", "</s>" and "<unk>" in them (the tokens, and no dummy prefix after one), and what the
// sentencepiece library gives with add_dummy_prefix off (encode_continuation).
TEST_F(SentencePieceTest, SpecialPiecesInATextAreTokensAndContinuationsHaveNoDummyPrefix) {
  const json vectors =
      json::parse(read_text(kLlama2Model.parent_path() / "special_text_vectors.json"));
  ASSERT_FALSE(vectors["texts"].empty());
  for (const json& c : vectors["texts"]) {
    EXPECT_EQ(tokenizer_->encode(c["text"].get<std::string>()),
              c["ids"].get<std::vector<int32_t>>())
        << c["text"];
  }
  ASSERT_FALSE(vectors["continuations"].empty());
  for (const json& c : vectors["continuations"]) {
    // The previous token does not matter: SentencePiece prefixes only where the whole text starts.
    for (const int32_t previous : {15043, 1}) {
      EXPECT_EQ(tokenizer_->encode_continuation(c["text"].get<std::string>(), previous),
                c["ids"].get<std::vector<int32_t>>())
          << c["text"];
    }
  }
}

TEST_F(SentencePieceTest, KnowsItsSpecialTokens) {
  EXPECT_EQ(tokenizer_->vocab_size(), 32000);
  EXPECT_EQ(tokenizer_->bos_id(), 1);
  EXPECT_EQ(tokenizer_->eos_id(), 2);
  EXPECT_EQ(tokenizer_->pad_id(), std::nullopt);
  EXPECT_EQ(tokenizer_->token_to_id("<unk>"), 0);
  EXPECT_EQ(tokenizer_->token_to_id("</s>"), 2);
  EXPECT_EQ(tokenizer_->token_to_id("▁Hello"), 15043);
  EXPECT_EQ(tokenizer_->token_to_id("no-such-piece"), std::nullopt);
  // Control tokens decode to nothing; unknown ids are skipped.
  EXPECT_EQ(tokenizer_->decode(std::vector<int32_t>{1, 15043, 2, -5, 32000}), "Hello");
}

TEST(LoadTokenizerTest, PicksTokenizerModelWithoutTokenizerJsonAndReadsItsConfig) {
  TempDir dir;
  fs::create_symlink(fs::absolute(kLlama2Model), dir.path() / "tokenizer.model");
  write_text(dir.path() / "tokenizer_config.json",
             R"({"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
                 "pad_token": "<unk>"})");
  const auto tokenizer = load_tokenizer(dir.path());
  EXPECT_EQ(tokenizer->encode("Hello"), std::vector<int32_t>{15043});
  EXPECT_EQ(tokenizer->bos_id(), 1);
  EXPECT_EQ(tokenizer->eos_id(), 2);
  EXPECT_EQ(tokenizer->pad_id(), 0);
}

TEST(LoadTokenizerTest, TokenizerJsonWinsOverTokenizerModelAsInTransformers) {
  // A SentencePiece-style conversion (what Hugging Face's Llama 2 directories hold beside
  // tokenizer.model) is used, as transformers 5 uses it: the 800-token test vocabulary, not
  // Llama 2's 32,000.
  TempDir dir;
  fs::create_symlink(fs::absolute(kLlama2Model), dir.path() / "tokenizer.model");
  fs::copy_file(kTokenizerData / "sp_legacy_style" / "tokenizer.json",
                dir.path() / "tokenizer.json");
  EXPECT_EQ(load_tokenizer(dir.path())->vocab_size(), 800);

  // So is a byte-level one.
  fs::copy_file(kTokenizerData / "llama3_style" / "tokenizer.json", dir.path() / "tokenizer.json",
                fs::copy_options::overwrite_existing);
  EXPECT_EQ(load_tokenizer(dir.path())->vocab_size(), 1008);
}

TEST(LoadTokenizerTest, ASentencePieceStyleTokenizerJsonLomoRefusesFallsBackToTokenizerModel) {
  TempDir dir;
  fs::create_symlink(fs::absolute(kLlama2Model), dir.path() / "tokenizer.model");
  json spec = json::parse(read_text(kTokenizerData / "sp_legacy_style" / "tokenizer.json"));
  spec["normalizer"] = {{"type", "BertNormalizer"}};
  write_text(dir.path() / "tokenizer.json", spec.dump());
  EXPECT_EQ(load_tokenizer(dir.path())->encode("Hello"), std::vector<int32_t>{15043});
  // Without tokenizer.model the refusal is the error.
  fs::remove(dir.path() / "tokenizer.model");
  EXPECT_THAT(error_of<std::invalid_argument>([&] { load_tokenizer(dir.path()); }),
              AllOf(HasSubstr("tokenizer.json"), HasSubstr("normalizer.type")));
}

TEST(LoadTokenizerTest, ABrokenByteLevelTokenizerJsonIsAnErrorEvenBesideTokenizerModel) {
  TempDir dir;
  fs::create_symlink(fs::absolute(kLlama2Model), dir.path() / "tokenizer.model");
  json spec = json::parse(read_text(kTokenizerData / "llama3_style" / "tokenizer.json"));
  spec["normalizer"] = {{"type", "BertNormalizer"}};
  write_text(dir.path() / "tokenizer.json", spec.dump());
  EXPECT_THAT(error_of<std::invalid_argument>([&] { load_tokenizer(dir.path()); }),
              AllOf(HasSubstr("tokenizer.json"), HasSubstr("normalizer.type")));
}

TEST(LoadTokenizerTest, ASentencePieceStyleTokenizerJsonAloneLoadsWithItsSpecialTokens) {
  const auto tokenizer = load_tokenizer(kTokenizerData / "sp_legacy_style");
  EXPECT_EQ(tokenizer->bos_id(), 1);
  EXPECT_EQ(tokenizer->eos_id(), 2);
  EXPECT_EQ(tokenizer->pad_id(), std::nullopt);
  EXPECT_EQ(tokenizer->token_to_id("<0x0A>"), 13);
  // "<s>" in the text is the token, and "▁" is prepended after it in this (legacy) style.
  const std::vector<int32_t> ids = tokenizer->encode("<s>Hello");
  ASSERT_GE(ids.size(), 2u);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(tokenizer->decode(ids), "<s> Hello");
}

TEST(LoadTokenizerTest, DummyPrefixIsKnownFromTheTokenizerJson) {
  // Prepend normalizer (legacy) or a Metaspace that prepends: every text starts a word.
  EXPECT_TRUE(load_tokenizer(kTokenizerData / "sp_legacy_style")->adds_dummy_prefix());
  EXPECT_TRUE(load_tokenizer(kTokenizerData / "metaspace_first_style")->adds_dummy_prefix());
  EXPECT_TRUE(load_tokenizer(kTokenizerData / "metaspace_always_style")->adds_dummy_prefix());
  EXPECT_FALSE(load_tokenizer(kTokenizerData / "metaspace_never_style")->adds_dummy_prefix());
  // A byte-level tokenizer has none, even with a Prepend normalizer (normalized_style).
  EXPECT_FALSE(load_tokenizer(kTokenizerData / "llama3_style")->adds_dummy_prefix());
  EXPECT_FALSE(load_tokenizer(kTokenizerData / "normalized_style")->adds_dummy_prefix());
  EXPECT_TRUE(SentencePieceTokenizer::load(kLlama2Model)->adds_dummy_prefix());
}

// ---------------------------------------------------------------------------------------------
// Special token ids from config.json and tokenizer_config.json.

class SpecialIdsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::copy_file(kTokenizerData / "llama3_style" / "tokenizer.json",
                  dir_.path() / "tokenizer.json");
  }
  TempDir dir_;
};

TEST_F(SpecialIdsTest, ConfigJsonGivesIdsAndTheFirstOfAnEosList) {
  write_text(dir_.path() / "config.json",
             R"({"bos_token_id": 1002, "eos_token_id": [1003, 1006], "pad_token_id": -1})");
  const auto tokenizer = load_tokenizer(dir_.path());
  EXPECT_EQ(tokenizer->bos_id(), 1002);
  EXPECT_EQ(tokenizer->eos_id(), 1003);
  EXPECT_EQ(tokenizer->pad_id(), std::nullopt);  // negative: none
}

TEST_F(SpecialIdsTest, TokenizerConfigTakesPrecedenceOverConfigJson) {
  // Llama 3.1 Instruct: config.json lists <|end_of_text|> first, the tokenizer ends turns with
  // <|eot_id|>; transformers' tokenizer (and lomo) take tokenizer_config.json's.
  write_text(dir_.path() / "config.json", R"({"bos_token_id": 1002, "eos_token_id": [1003]})");
  write_text(dir_.path() / "tokenizer_config.json", R"({"eos_token": "<|eot_id|>"})");
  const auto tokenizer = load_tokenizer(dir_.path());
  EXPECT_EQ(tokenizer->bos_id(), 1002);
  EXPECT_EQ(tokenizer->eos_id(), 1006);
}

TEST_F(SpecialIdsTest, NullInTokenizerConfigMeansNoneWhateverConfigJsonSays) {
  // Qwen2's files: bos_token null, yet config.json names a bos_token_id.
  write_text(dir_.path() / "config.json", R"({"bos_token_id": 1003, "eos_token_id": 1006})");
  write_text(dir_.path() / "tokenizer_config.json", R"({"bos_token": null})");
  const auto tokenizer = load_tokenizer(dir_.path());
  EXPECT_EQ(tokenizer->bos_id(), std::nullopt);
  EXPECT_EQ(tokenizer->eos_id(), 1006);
}

TEST_F(SpecialIdsTest, WithoutConfigFilesThereAreNone) {
  const auto tokenizer = load_tokenizer(dir_.path());
  EXPECT_EQ(tokenizer->bos_id(), std::nullopt);
  EXPECT_EQ(tokenizer->eos_id(), std::nullopt);
}

TEST_F(SpecialIdsTest, BadValuesAreErrorsNamingFileAndField) {
  write_text(dir_.path() / "config.json", R"({"eos_token_id": 5000})");
  EXPECT_THAT(error_of<std::invalid_argument>([&] { load_tokenizer(dir_.path()); }),
              AllOf(HasSubstr("config.json"), HasSubstr("eos_token_id"), HasSubstr("5000")));
  write_text(dir_.path() / "config.json", R"({"bos_token_id": "1"})");
  EXPECT_THAT(error_of<std::invalid_argument>([&] { load_tokenizer(dir_.path()); }),
              AllOf(HasSubstr("config.json"), HasSubstr("bos_token_id")));
  write_text(dir_.path() / "config.json", "{");
  EXPECT_THAT(error_of<std::invalid_argument>([&] { load_tokenizer(dir_.path()); }),
              AllOf(HasSubstr("config.json"), HasSubstr("not valid JSON")));
  fs::remove(dir_.path() / "config.json");

  write_text(dir_.path() / "tokenizer_config.json", R"({"eos_token": "<|no_such|>"})");
  EXPECT_THAT(
      error_of<std::invalid_argument>([&] { load_tokenizer(dir_.path()); }),
      AllOf(HasSubstr("tokenizer_config.json"), HasSubstr("eos_token"), HasSubstr("<|no_such|>")));
  write_text(dir_.path() / "tokenizer_config.json", R"({"pad_token": {"text": "x"}})");
  EXPECT_THAT(
      error_of<std::invalid_argument>([&] { load_tokenizer(dir_.path()); }),
      AllOf(HasSubstr("tokenizer_config.json"), HasSubstr("pad_token"), HasSubstr("content")));
  write_text(dir_.path() / "tokenizer_config.json", R"({"bos_token": 7})");
  EXPECT_THAT(error_of<std::invalid_argument>([&] { load_tokenizer(dir_.path()); }),
              AllOf(HasSubstr("tokenizer_config.json"), HasSubstr("bos_token")));
}

// ---------------------------------------------------------------------------------------------
// Malformed and unsupported files.

TEST(LoadTokenizerTest, MissingDirectoryOrFilesAreRuntimeErrors) {
  EXPECT_THAT(error_of<std::runtime_error>([] { load_tokenizer("/nonexistent/model"); }),
              AllOf(HasSubstr("/nonexistent/model"), HasSubstr("not a directory")));
  TempDir dir;
  EXPECT_THAT(error_of<std::runtime_error>([&] { load_tokenizer(dir.path()); }),
              AllOf(HasSubstr(dir.path().string()), HasSubstr("tokenizer.json"),
                    HasSubstr("tokenizer.model")));
  EXPECT_THAT(error_of<std::runtime_error>([&] { BpeTokenizer::load(dir.path() / "x.json"); }),
              HasSubstr("x.json"));
}

TEST(LoadTokenizerTest, CorruptTokenizerModelNamesTheFile) {
  TempDir dir;
  write_text(dir.path() / "tokenizer.model", "this is not a protobuf");
  EXPECT_THAT(error_of<std::invalid_argument>([&] { load_tokenizer(dir.path()); }),
              AllOf(HasSubstr("tokenizer.model"), HasSubstr("not a SentencePiece model")));
}

TEST(LoadTokenizerTest, InvalidTokenizerJsonNamesTheFile) {
  TempDir dir;
  write_text(dir.path() / "tokenizer.json", R"({"model": {"type": "BPE", )");
  EXPECT_THAT(error_of<std::invalid_argument>([&] { load_tokenizer(dir.path()); }),
              AllOf(HasSubstr("tokenizer.json"), HasSubstr("not valid JSON")));
}

// Each case edits the llama3_style tokenizer.json and expects from_json to reject it with a
// message naming the field (and the offending value where there is one).
class MalformedTokenizerJsonTest : public ::testing::Test {
 protected:
  static json base() {
    return json::parse(read_text(kTokenizerData / "llama3_style" / "tokenizer.json"));
  }
  static std::string rejection(const json& spec) {
    return error_of<std::invalid_argument>(
        [&] { BpeTokenizer::from_json(spec.dump(), "dir/tokenizer.json"); });
  }
};

TEST_F(MalformedTokenizerJsonTest, TheUnmodifiedBaseLoads) {
  EXPECT_NO_THROW(BpeTokenizer::from_json(base().dump(), "base"));
}

TEST_F(MalformedTokenizerJsonTest, UnsupportedModelType) {
  json spec = base();
  spec["model"]["type"] = "WordPiece";
  EXPECT_THAT(rejection(spec), AllOf(HasSubstr("dir/tokenizer.json"), HasSubstr("model.type"),
                                     HasSubstr("WordPiece")));
  spec["model"].erase("type");
  EXPECT_THAT(rejection(spec), AllOf(HasSubstr("model.type"), HasSubstr("missing")));
  spec.erase("model");
  EXPECT_THAT(rejection(spec), AllOf(HasSubstr("model"), HasSubstr("missing")));
}

TEST_F(MalformedTokenizerJsonTest, BadSplitPatternsAndBehaviorsAreNamed) {
  json spec = base();
  spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = R"(\w+|(\s+)";
  EXPECT_THAT(rejection(spec),
              AllOf(HasSubstr("dir/tokenizer.json: pre_tokenizer.pretokenizers[0].pattern.Regex"),
                    HasSubstr(R"(\w+|(\s+)"), HasSubstr("does not compile")));
  spec = base();
  spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] = json::object();
  EXPECT_THAT(rejection(spec), AllOf(HasSubstr("pattern.Regex"), HasSubstr("missing")));
  spec = base();
  spec["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways";
  EXPECT_THAT(rejection(spec), AllOf(HasSubstr("behavior"), HasSubstr("Sideways")));
}

TEST_F(MalformedTokenizerJsonTest, PreTokenizerMustEndInByteLevel) {
  // Without a ByteLevel step the vocabulary is one of text pieces, which the ByteLevel decoder
  // cannot decode.
  json spec = base();
  spec["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
  EXPECT_THAT(rejection(spec),
              AllOf(HasSubstr("pre_tokenizer.type"), HasSubstr("BertPreTokenizer")));
  spec = base();
  spec["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}};
  EXPECT_THAT(rejection(spec),
              AllOf(HasSubstr("decoder.type"), HasSubstr("pre_tokenizer"), HasSubstr("ByteLevel")));
  spec = base();
  const json metaspace = {{"type", "Metaspace"}, {"replacement", "▁"}};
  spec["pre_tokenizer"]["pretokenizers"].insert(spec["pre_tokenizer"]["pretokenizers"].begin(),
                                                metaspace);
  EXPECT_THAT(rejection(spec), AllOf(HasSubstr("pre_tokenizer"), HasSubstr("Metaspace")));
  spec = base();
  spec["pre_tokenizer"] = spec["pre_tokenizer"]["pretokenizers"][0];
  EXPECT_THAT(rejection(spec), AllOf(HasSubstr("pre_tokenizer"), HasSubstr("ByteLevel")));
  spec = base();
  spec["pre_tokenizer"] = {{"type", "WhitespaceSplit"}};
  EXPECT_THAT(rejection(spec), AllOf(HasSubstr("pre_tokenizer"), HasSubstr("ByteLevel")));
  spec = base();
  spec["pre_tokenizer"] = nullptr;
  EXPECT_THAT(rejection(spec), HasSubstr("pre_tokenizer"));
}

// The same for a SentencePiece-style tokenizer.json (metaspace_first_style: Metaspace
// pre-tokenizer, the Replace/ByteFallback/Fuse/Strip decoder).
TEST_F(MalformedTokenizerJsonTest, UnsupportedSentencePieceStyleFeaturesAreNamed) {
  const json sp_base =
      json::parse(read_text(kTokenizerData / "metaspace_first_style" / "tokenizer.json"));
  EXPECT_NO_THROW(BpeTokenizer::from_json(sp_base.dump(), "sp_base"));
  const std::vector<std::pair<std::function<void(json&)>, std::string>> cases = {
      {[](json& s) { s["pre_tokenizer"]["replacement"] = "ab"; }, "pre_tokenizer.replacement"},
      {[](json& s) { s["pre_tokenizer"].erase("replacement"); }, "pre_tokenizer.replacement"},
      {[](json& s) { s["pre_tokenizer"]["prepend_scheme"] = "sometimes"; },
       "pre_tokenizer.prepend_scheme"},
      // As in the library: add_prefix_space false needs prepend_scheme "never".
      {[](json& s) {
         s["pre_tokenizer"].erase("prepend_scheme");
         s["pre_tokenizer"]["add_prefix_space"] = false;
       },
       "pre_tokenizer.add_prefix_space"},
      {[](json& s) { s["pre_tokenizer"]["split"] = "yes"; }, "pre_tokenizer.split"},
      {[](json& s) {
         s["decoder"] = {{"type", "ByteLevel"}};
       },
       "decoder.type"},
      {[](json& s) { s["decoder"] = nullptr; }, "decoder"},
      {[](json& s) {
         s["decoder"]["decoders"][1] = {{"type", "CTC"}};
       },
       "decoder.decoders[1].type"},
      {[](json& s) { s["decoder"]["decoders"][3]["content"] = ""; }, "decoder.decoders[3].content"},
      {[](json& s) { s["decoder"]["decoders"][3]["start"] = -1; }, "decoder.decoders[3].start"},
      {[](json& s) { s["decoder"]["decoders"][3].erase("stop"); }, "decoder.decoders[3].stop"},
      {[](json& s) {
         s["decoder"]["decoders"][0]["pattern"] = {{"Regex", "(▁"}};
       },
       "decoder.decoders[0].pattern.Regex"},
      {[](json& s) { s["decoder"]["decoders"] = "Fuse"; }, "decoder.decoders"},
      {[](json& s) {
         s["decoder"] = {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "x"}};
       },
       "decoder.prepend_scheme"},
  };
  for (const auto& [change, field] : cases) {
    json spec = sp_base;
    change(spec);
    EXPECT_THAT(rejection(spec), AllOf(HasSubstr("dir/tokenizer.json: "), HasSubstr(field)))
        << field;
  }
}

TEST_F(MalformedTokenizerJsonTest, MergeReferencingAnUnknownTokenIsNamed) {
  json spec = base();
  spec["model"]["merges"].push_back({"zz", "top"});
  const size_t index = spec["model"]["merges"].size() - 1;
  EXPECT_THAT(rejection(spec),
              AllOf(HasSubstr("model.merges[" + std::to_string(index) + "]"), HasSubstr("\"zz\"")));
  spec = base();
  spec["model"]["merges"] = {"a b c"};
  EXPECT_THAT(rejection(spec), AllOf(HasSubstr("model.merges[0]"), HasSubstr("a b c")));
  spec["model"]["merges"] = {"Ġ t", json::array({"Ġ", "t"})};
  EXPECT_THAT(rejection(spec), HasSubstr("model.merges[1]"));
}

TEST_F(MalformedTokenizerJsonTest, UnsupportedFeaturesAreNamed) {
  const std::vector<std::pair<std::function<void(json&)>, std::string>> cases = {
      {[](json& s) {
         s["normalizer"] = {{"type", "BertNormalizer"}};
       },
       "normalizer.type"},
      {[](json& s) {
         s["normalizer"] = {{"type", "Sequence"},
                            {"normalizers", {{{"type", "NFC"}}, {{"type", "Strip"}}}}};
       },
       "normalizer.normalizers[1].type"},
      {[](json& s) {
         s["normalizer"] = {{"type", "Replace"}, {"pattern", {{"Regex", "[a"}}}, {"content", ""}};
       },
       "normalizer.pattern.Regex"},
      {[](json& s) {
         s["normalizer"] = {{"type", "Prepend"}};
       },
       "normalizer.prepend"},
      {[](json& s) { s["model"]["dropout"] = 0.1; }, "model.dropout"},
      {[](json& s) { s["model"]["continuing_subword_prefix"] = "##"; },
       "model.continuing_subword_prefix"},
      {[](json& s) { s["model"]["unk_token"] = "<unk>"; }, "model.unk_token"},
      {[](json& s) {
         s["decoder"] = {{"type", "Metaspace"}};
       },
       "decoder.type"},
      {[](json& s) { s["added_tokens"][0]["single_word"] = true; }, "added_tokens[0].single_word"},
      {[](json& s) { s["added_tokens"][0]["id"] = 5; }, "added_tokens[0].id"},
      {[](json& s) { s["model"]["vocab"]["extra"] = 0; }, "model.vocab"},
      {[](json& s) { s["model"]["vocab"]["extra"] = -3; }, "model.vocab[\"extra\"]"},
      {[](json& s) { s["version"] = "2.0"; }, "version"},
  };
  for (const auto& [change, field] : cases) {
    json spec = base();
    change(spec);
    EXPECT_THAT(rejection(spec), AllOf(HasSubstr("dir/tokenizer.json: "), HasSubstr(field)))
        << field;
  }
}

}  // namespace
}  // namespace lomo
