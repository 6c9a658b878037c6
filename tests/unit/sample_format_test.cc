// Records to token samples (worker/data): every format and chat template checked token by token,
// label masks included, against the rendered text of the template; every bad-input path of the
// record parser and the file loader, under both bad-record policies.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "worker/data/bpe_tokenizer.h"
#include "worker/data/byte_tokenizer.h"
#include "worker/data/chat_template.h"
#include "worker/data/jsonl_record.h"
#include "worker/data/sample_loader.h"
#include "worker/data/sentencepiece_tokenizer.h"
#include "worker/data/tokenizer.h"

namespace lomo {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

const fs::path kTokenizers = fs::path(LOMO_TEST_DATA_DIR) / "tokenizers";
const fs::path kLlama2Model = LOMO_LLAMA2_TOKENIZER_MODEL;

// The three tokenizers the templates are written for: Llama 3 style BPE (has <|begin_of_text|>,
// <|start_header_id|>, <|end_header_id|>, <|eot_id|>), Qwen2 style BPE (<|im_start|>,
// <|im_end|>), and the Llama 2 SentencePiece model (<s>, </s>).
const Tokenizer& llama3() {
  static const std::unique_ptr<Tokenizer> t = load_tokenizer(kTokenizers / "llama3_style");
  return *t;
}
const Tokenizer& qwen2() {
  static const std::unique_ptr<Tokenizer> t = load_tokenizer(kTokenizers / "qwen2_style");
  return *t;
}
const Tokenizer& llama2() {
  static const std::unique_ptr<Tokenizer> t = [] {
    std::unique_ptr<Tokenizer> tokenizer = SentencePieceTokenizer::load(kLlama2Model);
    return tokenizer;
  }();
  return *t;
}

// The Llama 3 style tokenizer with more added tokens (ids 1008, 1009, ...).
std::unique_ptr<Tokenizer> llama3_with_tokens(const std::vector<std::string>& tokens) {
  std::ifstream in(kTokenizers / "llama3_style" / "tokenizer.json");
  nlohmann::json json = nlohmann::json::parse(in);
  int id = 1008;
  for (const std::string& token : tokens) {
    json["added_tokens"].push_back({{"id", id++}, {"content", token}, {"special", true}});
  }
  return BpeTokenizer::from_json(json.dump(), "llama3_style+added");
}

// Builds the expected sample piece by piece: text is encoded on its own, as the templates do.
class Expected {
 public:
  explicit Expected(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}
  Expected& text(const std::string& text, bool trainable) {
    for (const int32_t id : tokenizer_.encode(text)) add(id, trainable);
    return *this;
  }
  Expected& token(const std::string& name, bool trainable) {
    const std::optional<int32_t> id = tokenizer_.token_to_id(name);
    EXPECT_TRUE(id.has_value()) << name;
    add(id.value_or(-1), trainable);
    return *this;
  }
  Expected& id(int32_t id, bool trainable) {
    add(id, trainable);
    return *this;
  }
  const TokenSample& sample() const { return sample_; }

 private:
  void add(int32_t id, bool trainable) {
    sample_.ids.push_back(id);
    sample_.trainable.push_back(trainable ? 1 : 0);
  }
  const Tokenizer& tokenizer_;
  TokenSample sample_;
};

// Compares two samples token by token, printing each mismatch with its decoded token.
void expect_same_sample(const TokenSample& actual, const TokenSample& expected,
                        const Tokenizer& tokenizer) {
  ASSERT_EQ(actual.ids.size(), actual.trainable.size());
  EXPECT_EQ(actual.ids.size(), expected.ids.size());
  for (size_t i = 0; i < std::min(actual.ids.size(), expected.ids.size()); ++i) {
    const std::vector<int32_t> one = {expected.ids[i]};
    EXPECT_EQ(actual.ids[i], expected.ids[i])
        << "token " << i << " '" << tokenizer.decode(one) << "'";
    EXPECT_EQ(actual.trainable[i], expected.trainable[i])
        << "mask of token " << i << " '" << tokenizer.decode(one) << "'";
  }
}

// The text of the trainable tokens, in order.
std::string trainable_text(const TokenSample& sample, const Tokenizer& tokenizer) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < sample.ids.size(); ++i) {
    if (sample.trainable[i]) ids.push_back(sample.ids[i]);
  }
  return tokenizer.decode(ids);
}

TokenSample parse(const Tokenizer& tokenizer, DataFormat format, const std::string& line,
                  std::optional<ChatTemplate> chat_template = std::nullopt,
                  bool train_on_prompt = false) {
  return RecordParser(tokenizer, {format, chat_template, train_on_prompt}).sample(line);
}

constexpr const char* kConversation =
    R"({"messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": " Hello! "},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}], "id": 7})";

// ---------------------------------------------------------------------------------------------
// Formats and templates, token by token.

TEST(ChatTemplateTest, Llama3MasksEverythingButAssistantContentAndItsEndOfTurn) {
  const Tokenizer& t = llama3();
  const TokenSample sample = parse(t, DataFormat::kChat, kConversation, ChatTemplate::kLlama3);
  Expected e(t);
  e.token("<|begin_of_text|>", false);
  for (const auto& [role, content, answer] :
       std::vector<std::tuple<std::string, std::string, bool>>{{"system", "You are terse.", false},
                                                               {"user", "Hi there", false},
                                                               {"assistant", "Hello!", true},
                                                               {"user", "2+2?", false},
                                                               {"assistant", "4", true}}) {
    e.token("<|start_header_id|>", false).text(role, false).token("<|end_header_id|>", false);
    e.text("\n\n", false).text(content, answer).token("<|eot_id|>", answer);
  }
  expect_same_sample(sample, e.sample(), t);
  EXPECT_EQ(trainable_text(sample, t), "Hello!<|eot_id|>4<|eot_id|>");
  // The rendered text is Meta's template (content trimmed), and encoding it whole (special tokens
  // matched in the text, as Hugging Face's apply_chat_template + tokenize do) gives the same ids.
  const std::string rendered =
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>";
  EXPECT_EQ(t.decode(sample.ids), rendered);
  EXPECT_EQ(sample.ids, t.encode(rendered));
}

TEST(ChatTemplateTest, ChatmlMasksEverythingButAssistantContentAndImEnd) {
  // Qwen2's pre-tokenizer is Llama 3's; the Qwen2 style test tokenizer adds a prefix space to
  // every text, which real Qwen2 tokenizers do not, so the Llama 3 style one stands in.
  const std::unique_ptr<Tokenizer> owner = llama3_with_tokens({"<|im_start|>", "<|im_end|>"});
  const Tokenizer& t = *owner;
  const TokenSample sample = parse(t, DataFormat::kChat, kConversation, ChatTemplate::kChatml);
  Expected e(t);
  for (const auto& [role, content, answer] :
       std::vector<std::tuple<std::string, std::string, bool>>{{"system", "You are terse.", false},
                                                               {"user", "Hi there", false},
                                                               {"assistant", " Hello! ", true},
                                                               {"user", "2+2?", false},
                                                               {"assistant", "4", true}}) {
    e.token("<|im_start|>", false).text(role + "\n", false).text(content, answer);
    e.token("<|im_end|>", answer).text("\n", false);
  }
  expect_same_sample(sample, e.sample(), t);
  EXPECT_EQ(trainable_text(sample, t), " Hello! <|im_end|>4<|im_end|>");  // chatml keeps spaces
  const std::string rendered =
      "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
      "<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
      "<|im_start|>assistant\n4<|im_end|>\n";
  EXPECT_EQ(t.decode(sample.ids), rendered);
  EXPECT_EQ(sample.ids, t.encode(rendered));
}

TEST(ChatTemplateTest, Llama2TokenizesAsMetasReferenceChatCompletion) {
  const Tokenizer& t = llama2();
  const TokenSample sample = parse(t, DataFormat::kChat, kConversation, ChatTemplate::kLlama2);
  // Meta's llama/generation.py encodes each turn as one string with BOS and EOS:
  // encode(f"[INST] {user} [/INST] {answer} ", bos=True, eos=True), the system prompt folded
  // into the first user message.
  auto turn = [&](const std::string& user, const std::string& answer) {
    std::vector<int32_t> ids = {1};
    const std::vector<int32_t> text = t.encode("[INST] " + user + " [/INST] " + answer + " ");
    ids.insert(ids.end(), text.begin(), text.end());
    ids.push_back(2);
    return ids;
  };
  std::vector<int32_t> reference = turn("<<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there", "Hello!");
  const std::vector<int32_t> second = turn("2+2?", "4");
  reference.insert(reference.end(), second.begin(), second.end());
  EXPECT_EQ(sample.ids, reference);
  // The mask, piece by piece: the answers (with the trailing space) and </s> are trainable.
  Expected e(t);
  e.id(1, false).text("[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST]", false);
  e.text("Hello! ", true).id(2, true);
  e.id(1, false).text("[INST] 2+2? [/INST]", false).text("4 ", true).id(2, true);
  expect_same_sample(sample, e.sample(), t);
}

TEST(ChatTemplateTest, Llama2WithAByteLevelTokenizerKeepsTheAnswersLeadingSpace) {
  // A BPE tokenizer has no dummy prefix, so the space after [/INST] is encoded with the answer.
  const std::unique_ptr<Tokenizer> t = llama3_with_tokens({"<s>", "</s>"});
  const TokenSample sample = parse(*t, DataFormat::kChat,
                                   R"({"messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Yo"}]})",
                                   ChatTemplate::kLlama2);
  Expected e(*t);
  e.token("<s>", false).text("[INST] Hi [/INST]", false).text(" Yo ", true).token("</s>", true);
  expect_same_sample(sample, e.sample(), *t);
  EXPECT_EQ(t->decode(sample.ids), "<s>[INST] Hi [/INST] Yo </s>");  // Hugging Face's rendering
  // And a tokenizer without them is refused up front.
  EXPECT_THAT([] { ChatFormatter(ChatTemplate::kLlama2, llama3()); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr(
                  "chat template llama-2 needs the token <s>, which the tokenizer does not have")));
}

TEST(ChatTemplateTest, TrainOnPromptMakesEveryTokenTrainableWithTheSameIds) {
  const Tokenizer& t = llama3();
  const TokenSample masked = parse(t, DataFormat::kChat, kConversation, ChatTemplate::kLlama3);
  const TokenSample all =
      parse(t, DataFormat::kChat, kConversation, ChatTemplate::kLlama3, /*train_on_prompt=*/true);
  EXPECT_EQ(all.ids, masked.ids);
  EXPECT_THAT(all.trainable, ::testing::Each(1));
}

TEST(ChatTemplateTest, TemplatesAcceptAnyRoleOrderButLlama2) {
  const std::string user_last =
      R"({"messages": [{"role": "assistant", "content": "Welcome."},
                       {"role": "user", "content": "Thanks"}]})";
  EXPECT_NO_THROW(parse(llama3(), DataFormat::kChat, user_last, ChatTemplate::kLlama3));
  EXPECT_NO_THROW(parse(qwen2(), DataFormat::kChat, user_last, ChatTemplate::kChatml));
  try {
    parse(llama2(), DataFormat::kChat, user_last, ChatTemplate::kLlama2);
    FAIL() << "llama-2 accepted a conversation starting with the assistant";
  } catch (const RecordError& e) {
    EXPECT_EQ(e.field(), "messages[0].role");
    EXPECT_THAT(e.what(), HasSubstr("expected user, got assistant"));
  }
}

TEST(ChatTemplateTest, TemplateTokensMissingFromTheTokenizerAreNamed) {
  EXPECT_THAT([] { ChatFormatter(ChatTemplate::kChatml, llama3()); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  HasSubstr("chat template chatml needs the token <|im_start|>")));
  EXPECT_THAT([] { ChatFormatter(ChatTemplate::kLlama3, qwen2()); },
              ::testing::ThrowsMessage<std::invalid_argument>(
                  HasSubstr("chat template llama-3 needs the token <|begin_of_text|>")));
  const ByteTokenizer bytes;
  EXPECT_THROW(RecordParser(bytes, {DataFormat::kChat, ChatTemplate::kLlama3, false}),
               std::invalid_argument);
  EXPECT_THROW(RecordParser(bytes, {DataFormat::kChat, std::nullopt, false}),
               std::invalid_argument);
}

TEST(RecordFormatTest, AlpacaUsesStanfordsPromptsAndTrainsOnOutputAndEos) {
  const Tokenizer& t = llama3();  // BOS <|begin_of_text|>, EOS <|eot_id|> (tokenizer_config.json)
  const std::string with_input =
      "Below is an instruction that describes a task, paired with an input that provides further "
      "context. Write a response that appropriately completes the request.\n\n"
      "### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n";
  const TokenSample a = parse(t, DataFormat::kAlpaca,
                              R"({"instruction": "Translate.", "input": "chat", "output": "cat"})");
  Expected ea(t);
  ea.token("<|begin_of_text|>", false).text(with_input, false).text("cat", true);
  ea.token("<|eot_id|>", true);
  expect_same_sample(a, ea.sample(), t);
  EXPECT_EQ(trainable_text(a, t), "cat<|eot_id|>");

  const std::string without_input =
      "Below is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n";
  for (const char* record : {R"({"instruction": "Say hi.", "output": "hi"})",
                             R"({"instruction": "Say hi.", "input": "", "output": "hi"})",
                             R"({"instruction": "Say hi.", "input": null, "output": "hi"})"}) {
    Expected eb(t);
    eb.token("<|begin_of_text|>", false).text(without_input, false).text("hi", true);
    eb.token("<|eot_id|>", true);
    expect_same_sample(parse(t, DataFormat::kAlpaca, record), eb.sample(), t);
  }
  const TokenSample all =
      parse(t, DataFormat::kAlpaca, R"({"instruction": "Say hi.", "output": "hi"})", std::nullopt,
            /*train_on_prompt=*/true);
  EXPECT_THAT(all.trainable, ::testing::Each(1));
}

TEST(RecordFormatTest, PromptCompletionTrainsOnCompletionAndEos) {
  const Tokenizer& t = qwen2();  // no BOS; EOS <|im_end|>
  const TokenSample s =
      parse(t, DataFormat::kPromptCompletion, R"({"prompt": "2+2=", "completion": " 4"})");
  Expected e(t);
  e.text("2+2=", false).text(" 4", true).token("<|im_end|>", true);
  expect_same_sample(s, e.sample(), t);
}

TEST(RecordFormatTest, JsonlTextTrainsOnEveryToken) {
  const Tokenizer& t = llama3();
  const TokenSample s = parse(t, DataFormat::kJsonlText, R"({"text": "Hello world"})");
  Expected e(t);
  // BOS is never a target (nothing predicts the first token), so its flag is 0.
  e.token("<|begin_of_text|>", false).text("Hello world", true).token("<|eot_id|>", true);
  expect_same_sample(s, e.sample(), t);
  // The bytes tokenizer: the bytes, nothing added.
  const ByteTokenizer bytes;
  const TokenSample b = parse(bytes, DataFormat::kJsonlText, R"({"text": "hi\n"})");
  EXPECT_THAT(b.ids, ElementsAre('h', 'i', '\n'));
  EXPECT_THAT(b.trainable, ElementsAre(1, 1, 1));
}

TEST(RecordFormatTest, MultipleChoiceScoresEachCandidateAfterTheSharedContext) {
  const Tokenizer& t = llama3();
  const RecordParser parser(t, {DataFormat::kMultipleChoice, std::nullopt, false});
  const MultipleChoiceRecord r =
      parser.multiple_choice(R"({"context": "Is water wet? Answer:", "choices": [" No", " Yes"],
                                 "label": 1})");
  EXPECT_EQ(r.label, 1);
  ASSERT_EQ(r.candidates.size(), 2u);
  for (const auto& [index, choice] :
       std::vector<std::pair<size_t, std::string>>{{0, " No"}, {1, " Yes"}}) {
    Expected e(t);
    e.token("<|begin_of_text|>", false).text("Is water wet? Answer:", false).text(choice, true);
    e.token("<|eot_id|>", true);
    expect_same_sample(r.candidates[index], e.sample(), t);
  }
}

// ---------------------------------------------------------------------------------------------
// Bad records: the parser names the field and the problem.

struct BadRecord {
  const char* name;
  DataFormat format;
  std::string line;
  std::string field;
  std::string message;  // part of what()
};

void PrintTo(const BadRecord& r, std::ostream* os) { *os << r.name; }

class BadRecordTest : public ::testing::TestWithParam<BadRecord> {};

TEST_P(BadRecordTest, NamesTheFieldAndTheProblem) {
  const BadRecord& c = GetParam();
  static const ByteTokenizer bytes;  // no BOS/EOS: an empty text has nothing to train on
  const Tokenizer& t =
      c.format == DataFormat::kJsonlText ? static_cast<const Tokenizer&>(bytes) : llama3();
  const RecordParser parser(t, {c.format, ChatTemplate::kLlama3, false});
  try {
    if (c.format == DataFormat::kMultipleChoice) {
      parser.multiple_choice(c.line);
    } else {
      parser.sample(c.line);
    }
    FAIL() << "accepted: " << c.line;
  } catch (const RecordError& e) {
    EXPECT_EQ(e.field(), c.field) << e.what();
    EXPECT_THAT(e.what(), HasSubstr(c.message));
    if (!c.field.empty()) {
      EXPECT_THAT(e.what(), ::testing::StartsWith("field '" + c.field + "': "));
    }
  }
}

const BadRecord kBadRecords[] = {
    {"NotJson", DataFormat::kAlpaca, R"({"instruction": "x", )", "", "not valid JSON: column"},
    {"TrailingGarbage", DataFormat::kAlpaca, R"({"instruction": "x", "output": "y"} x)", "",
     "not valid JSON"},
    {"InvalidUtf8", DataFormat::kPromptCompletion, "{\"prompt\": \"\xff\", \"completion\": \"y\"}",
     "", "not valid JSON"},
    {"HugeNumber", DataFormat::kMultipleChoice,
     R"({"context": "c", "choices": ["a", "b"], "label": 1e999})", "", "not valid JSON"},
    {"NotAnObject", DataFormat::kChat, R"([{"role": "user"}])", "",
     "expected a JSON object, got an array"},
    {"TextMissing", DataFormat::kJsonlText, R"({"txt": "hello"})", "text", "required"},
    {"TextIsANumber", DataFormat::kJsonlText, R"({"text": 5})", "text",
     "expected a string, got an integer"},
    {"TextEmptyWithoutBosEos", DataFormat::kJsonlText, R"({"text": ""})", "",
     "no trainable tokens"},
    {"OutputMissing", DataFormat::kAlpaca, R"({"instruction": "x", "input": "y"})", "output",
     "required"},
    {"InputIsAList", DataFormat::kAlpaca, R"({"instruction": "x", "input": [], "output": "y"})",
     "input", "expected a string, got an array"},
    {"CompletionIsNull", DataFormat::kPromptCompletion, R"({"prompt": "x", "completion": null})",
     "completion", "expected a string, got null"},
    {"MessagesMissing", DataFormat::kChat, R"({"conversation": []})", "messages", "required"},
    {"MessagesIsAString", DataFormat::kChat, R"({"messages": "hi"})", "messages",
     "expected an array, got a string"},
    {"MessagesEmpty", DataFormat::kChat, R"({"messages": []})", "messages", "no messages"},
    {"MessageIsAString", DataFormat::kChat, R"({"messages": ["hi"]})", "messages[0]",
     "expected an object, got a string"},
    {"UnknownRole", DataFormat::kChat,
     R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "bot", "content": "c"}]})",
     "messages[2].role", "unknown role 'bot' (expected system, user, assistant)"},
    {"RoleMissing", DataFormat::kChat, R"({"messages": [{"content": "a"}]})", "messages[0].role",
     "required"},
    {"ContentIsANumber", DataFormat::kChat, R"({"messages": [{"role": "user", "content": 1.5}]})",
     "messages[0].content", "expected a string, got a number"},
    {"NoAssistantMessage", DataFormat::kChat,
     R"({"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]})", "",
     "no trainable tokens (the conversation has no assistant message)"},
    {"ChoicesTooFew", DataFormat::kMultipleChoice,
     R"({"context": "c", "choices": ["a"], "label": 0})", "choices",
     "expected at least 2 candidates, got 1"},
    {"ChoiceIsANumber", DataFormat::kMultipleChoice,
     R"({"context": "c", "choices": ["a", 2], "label": 0})", "choices[1]",
     "expected a string, got an integer"},
    {"LabelOutOfRange", DataFormat::kMultipleChoice,
     R"({"context": "c", "choices": ["a", "b"], "label": 2})", "label",
     "must index choices (0 to 1), got 2"},
    {"LabelNegative", DataFormat::kMultipleChoice,
     R"({"context": "c", "choices": ["a", "b"], "label": -1})", "label", "got -1"},
    {"LabelIsAString", DataFormat::kMultipleChoice,
     R"({"context": "c", "choices": ["a", "b"], "label": "1"})", "label",
     "expected an integer, got a string"},
    {"ContextMissing", DataFormat::kMultipleChoice, R"({"choices": ["a", "b"], "label": 0})",
     "context", "required"},
};

INSTANTIATE_TEST_SUITE_P(EveryPath, BadRecordTest, ::testing::ValuesIn(kBadRecords),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(RecordErrorTest, MultipleChoiceRecordsAreNotTrainingSamples) {
  const RecordParser parser(llama3(), {DataFormat::kMultipleChoice, std::nullopt, false});
  EXPECT_THAT([&] { parser.sample(R"({"context": "c", "choices": ["a", "b"], "label": 0})"); },
              ::testing::ThrowsMessage<RecordError>(HasSubstr("for evaluation only")));
}

TEST(RecordErrorTest, LongAndControlValuesAreQuotedShort) {
  const std::string role(500, 'x');
  try {
    parse(llama3(), DataFormat::kChat,
          R"({"messages": [{"role": ")" + role + R"(\n", "content": "c"}]})",
          ChatTemplate::kLlama3);
    FAIL();
  } catch (const RecordError& e) {
    EXPECT_LT(std::string(e.what()).size(), 200u) << e.what();
    EXPECT_THAT(e.what(), HasSubstr("xxx...'"));
  }
}

// ---------------------------------------------------------------------------------------------
// Files: the loader, its errors and the bad-record policy.

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("lomo_sample_format_test_" + std::to_string(::getpid()) +
                                         "_" + std::to_string(next_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream(path_ / name, std::ios::binary) << bytes;
    return (path_ / name).string();
  }

 private:
  static inline int next_ = 0;
  fs::path path_;
};

LoadOptions chat_options(BadRecordPolicy policy = BadRecordPolicy::kFail) {
  LoadOptions o;
  o.format = DataFormat::kChat;
  o.chat_template = ChatTemplate::kLlama3;
  o.max_length = 64;
  o.on_bad_record = policy;
  return o;
}

const std::string kGood =
    R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})";
const std::string kBadRole =
    R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},)"
    R"( {"role": "bot", "content": "c"}]})";

// The error `load` throws; fails the test when it throws none.
template <typename Load>
DataError data_error(const Load& load) {
  try {
    load();
  } catch (const DataError& e) {
    return e;
  }
  ADD_FAILURE() << "loaded without error";
  return DataError(std::nullopt, "(none)");
}

TEST(SampleLoaderTest, ABadRecordFailsWithFileLineAndField) {
  TempDir dir;
  const std::string good = dir.write("good.jsonl", kGood + "\n");
  // Line 3 (a blank line counts as a line) is bad; \r\n line ends are accepted.
  const std::string bad = dir.write("train.jsonl", kGood + "\r\n\r\n" + kBadRole + "\r\n" + kGood);
  const DataError e = data_error([&] { load_samples({good, bad}, llama3(), chat_options()); });
  EXPECT_EQ(e.file_index(), 1u);
  EXPECT_EQ(std::string(e.what()),
            bad +
                ":3: field 'messages[2].role': unknown role 'bot' (expected system, user, "
                "assistant)");
}

TEST(SampleLoaderTest, SkipPolicyCountsBadRecordsAndKeepsTheRest) {
  TempDir dir;
  const std::string file = dir.write(
      "train.jsonl", "\xEF\xBB\xBF" + kGood + "\n" + kBadRole + "\nnot json\n" + kGood + "\n\n");
  const LoadedSamples loaded = load_samples({file}, llama3(), chat_options(BadRecordPolicy::kSkip));
  EXPECT_EQ(loaded.report.samples, 2);
  EXPECT_EQ(loaded.report.skipped, 2);
  EXPECT_EQ(loaded.store.size(), 2);
  EXPECT_THAT(loaded.report.skipped_examples,
              ElementsAre(file + ":2: field 'messages[2].role': unknown role 'bot' (expected "
                                 "system, user, assistant)",
                          HasSubstr(file + ":3: not valid JSON: column 2")));
  // The byte order mark did not break the first record.
  EXPECT_EQ(loaded.store.samples[0].length, loaded.store.samples[1].length);
}

TEST(SampleLoaderTest, EmptyFilesAndUnreadableFilesFailUnderEitherPolicy) {
  TempDir dir;
  const std::string good = dir.write("good.jsonl", kGood);
  for (const BadRecordPolicy policy : {BadRecordPolicy::kFail, BadRecordPolicy::kSkip}) {
    const std::string empty = dir.write("empty.jsonl", "");
    DataError e = data_error([&] { load_samples({good, empty}, llama3(), chat_options(policy)); });
    EXPECT_EQ(e.file_index(), 1u);
    EXPECT_THAT(e.what(), HasSubstr("empty.jsonl: empty file (no records)"));
    const std::string blank = dir.write("blank.jsonl", "\n  \n\r\n");
    e = data_error([&] { load_samples({blank}, llama3(), chat_options(policy)); });
    EXPECT_THAT(e.what(), HasSubstr("blank.jsonl: empty file"));
    e = data_error([&] {
      load_samples({good, (fs::path(good).parent_path() / "missing.jsonl").string()}, llama3(),
                   chat_options(policy));
    });
    EXPECT_EQ(e.file_index(), 1u);
    EXPECT_THAT(e.what(), HasSubstr("cannot read '"));
    e = data_error([&] {
      load_samples({fs::path(good).parent_path().string()}, llama3(), chat_options(policy));
    });
    EXPECT_THAT(e.what(), HasSubstr("is a directory"));
  }
}

TEST(SampleLoaderTest, AllRecordsSkippedIsAnErrorOfTheWholeList) {
  TempDir dir;
  const std::string file = dir.write("bad.jsonl", kBadRole + "\n{}\n");
  const DataError e =
      data_error([&] { load_samples({file}, llama3(), chat_options(BadRecordPolicy::kSkip)); });
  EXPECT_EQ(e.file_index(), std::nullopt);
  EXPECT_THAT(e.what(), HasSubstr("no usable record in any file (2 skipped)"));
}

TEST(SampleLoaderTest, LongSamplesAreCutAndAPromptBeyondMaxLengthIsABadRecord) {
  TempDir dir;
  const ByteTokenizer bytes;
  LoadOptions o;
  o.format = DataFormat::kPromptCompletion;
  o.max_length = 8;
  // 4 prompt bytes + 10 completion bytes: cut to 9 tokens, 5 of them trainable.
  const std::string long_completion = R"({"prompt": "abcd", "completion": "0123456789"})";
  // 9 prompt bytes: nothing trainable within the first 9 tokens.
  const std::string long_prompt = R"({"prompt": "abcdefghi", "completion": "z"})";
  const std::string file = dir.write("pc.jsonl", long_completion + "\n" + long_prompt + "\n");
  DataError e = data_error([&] { load_samples({file}, bytes, o); });
  EXPECT_THAT(e.what(), HasSubstr("pc.jsonl:2: no trainable tokens within data.max_length: the "
                                  "record has 10 tokens and only its first 9 are used"));
  o.on_bad_record = BadRecordPolicy::kSkip;
  const LoadedSamples loaded = load_samples({file}, bytes, o);
  EXPECT_EQ(loaded.report.truncated, 1);
  EXPECT_EQ(loaded.report.skipped, 1);
  ASSERT_EQ(loaded.store.size(), 1);
  EXPECT_EQ(loaded.store.samples[0].length, 9);
  EXPECT_THAT(loaded.store.tokens, ElementsAre('a', 'b', 'c', 'd', '0', '1', '2', '3', '4'));
  EXPECT_THAT(loaded.store.trainable, ElementsAre(0, 0, 0, 0, 1, 1, 1, 1, 1));
}

TEST(SampleLoaderTest, TextFilesAreOneStreamCutIntoOverlappingRows) {
  TempDir dir;
  const ByteTokenizer bytes;
  LoadOptions o;
  o.format = DataFormat::kText;
  o.max_length = 4;
  const std::string a = dir.write("a.txt", "abcdef"), b = dir.write("b.txt", "ghijk");
  const LoadedSamples loaded = load_samples({a, b}, bytes, o);
  // 11 bytes: (11 − 1) / 4 = 2 rows, "abcde" and "efghi"; "jk" is dropped.
  ASSERT_EQ(loaded.store.size(), 2);
  EXPECT_EQ(loaded.store.samples[0].begin, 0);
  EXPECT_EQ(loaded.store.samples[1].begin, 4);
  EXPECT_EQ(loaded.store.samples[1].length, 5);
  EXPECT_EQ(std::string(loaded.store.tokens.begin(), loaded.store.tokens.end()), "abcdefghi");
  EXPECT_TRUE(loaded.store.trainable.empty());  // every token trainable
  o.max_length = 10;
  EXPECT_EQ(load_samples({a, b}, bytes, o).store.size(), 1);  // 11 tokens: exactly one row
  o.max_length = 11;
  EXPECT_THAT(data_error([&] {
                load_samples({a, b}, bytes, o);
              }).what(),
              HasSubstr("11 tokens are too few for one row of data.max_length + 1 = 12 tokens"));
  // A tokenizer with BOS and EOS frames each file with them.
  o.max_length = 2;
  const LoadedSamples framed = load_samples({a}, llama3(), o);
  EXPECT_EQ(framed.store.tokens.front(), 1002);
}

std::string le_bytes(const std::vector<uint32_t>& ids, size_t width) {
  std::string bytes;
  for (const uint32_t id : ids) {
    for (size_t k = 0; k < width; ++k) bytes.push_back(static_cast<char>((id >> (8 * k)) & 0xff));
  }
  return bytes;
}

TEST(SampleLoaderTest, TokenFilesAreCutPerFileIntoRowsOfTPlusOne) {
  TempDir dir;
  const ByteTokenizer bytes;
  LoadOptions o;
  o.format = DataFormat::kTokens;
  o.max_length = 3;
  o.vocab_size = 70000;
  std::vector<uint32_t> ids(10);
  for (uint32_t i = 0; i < 10; ++i) ids[i] = 100 + i;
  for (const auto& [dtype, width] : std::vector<std::pair<TokenDtype, size_t>>{
           {TokenDtype::kUint16, 2}, {TokenDtype::kUint32, 4}}) {
    o.token_dtype = dtype;
    const std::string first = dir.write("a.bin", le_bytes(ids, width));
    const std::string second = dir.write("b.bin", le_bytes({7, 8, 9, 10, 11}, width));
    const LoadedSamples loaded = load_samples({first, second}, bytes, o);
    // a.bin: 10 tokens → (10 − 1) / 3 = 3 rows [100..103], [103..106], [106..109];
    // b.bin: 5 tokens → 1 row [7..10]; rows never span two files.
    ASSERT_EQ(loaded.store.size(), 4);
    std::vector<std::vector<int32_t>> rows;
    for (const auto& span : loaded.store.samples) {
      rows.emplace_back(loaded.store.tokens.begin() + span.begin,
                        loaded.store.tokens.begin() + span.begin + span.length);
    }
    EXPECT_THAT(rows, ElementsAre(ElementsAre(100, 101, 102, 103), ElementsAre(103, 104, 105, 106),
                                  ElementsAre(106, 107, 108, 109), ElementsAre(7, 8, 9, 10)));
  }
  // Large ids need uint32.
  o.token_dtype = TokenDtype::kUint32;
  const std::string big = dir.write("big.bin", le_bytes({1, 65536, 69999, 3, 4}, 4));
  EXPECT_EQ(load_samples({big}, bytes, o).store.tokens[1], 65536);
}

TEST(SampleLoaderTest, BadTokenFilesAreNamed) {
  TempDir dir;
  const ByteTokenizer bytes;
  LoadOptions o;
  o.format = DataFormat::kTokens;
  o.max_length = 3;
  o.vocab_size = 1000;
  const std::string odd = dir.write("odd.bin", std::string(9, '\0'));
  EXPECT_THAT(data_error([&] { load_samples({odd}, bytes, o); }).what(),
              HasSubstr("odd.bin: 9 bytes is not a whole number of uint16 token ids"));
  const std::string outside = dir.write("outside.bin", le_bytes({1, 2, 1000, 3, 4}, 2));
  EXPECT_THAT(data_error([&] { load_samples({outside}, bytes, o); }).what(),
              HasSubstr("outside.bin: token 2 (byte offset 4) is 1000, outside the vocabulary of "
                        "1000"));
  const std::string short_file = dir.write("short.bin", le_bytes({1, 2, 3}, 2));
  const DataError e = data_error([&] { load_samples({odd, short_file}, bytes, o); });
  EXPECT_EQ(e.file_index(), 0u);  // the first bad file is named
  EXPECT_THAT(data_error([&] { load_samples({short_file}, bytes, o); }).what(),
              HasSubstr("short.bin: 3 tokens are too few for one row"));
  const std::string empty = dir.write("empty.bin", "");
  EXPECT_THAT(data_error([&] { load_samples({empty}, bytes, o); }).what(),
              HasSubstr("empty.bin: empty file"));
}

TEST(SampleLoaderTest, MultipleChoiceCandidatesLoseContextNotScoredTokens) {
  TempDir dir;
  const ByteTokenizer bytes;
  LoadOptions o;
  o.max_length = 6;
  const std::string file =
      dir.write("mc.jsonl", R"({"context": "0123456789", "choices": ["ab", "xyz"], "label": 1})"
                            "\n"
                            R"({"context": "c", "choices": ["a", "0123456789"], "label": 0})"
                            "\n");
  EXPECT_THAT(data_error([&] { load_multiple_choice({file}, bytes, o); }).what(),
              HasSubstr("mc.jsonl:2: field 'choices[1]': 10 tokens to score do not fit "
                        "data.max_length 6"));
  o.on_bad_record = BadRecordPolicy::kSkip;
  const LoadedMultipleChoice loaded = load_multiple_choice({file}, bytes, o);
  ASSERT_EQ(loaded.records.size(), 1u);
  EXPECT_EQ(loaded.report.truncated, 1);
  EXPECT_EQ(loaded.report.skipped, 1);
  const TokenSample& xyz = loaded.records[0].candidates[1];
  EXPECT_EQ(std::string(xyz.ids.begin(), xyz.ids.end()), "6789xyz");
  EXPECT_THAT(xyz.trainable, ElementsAre(0, 0, 0, 0, 1, 1, 1));
}

}  // namespace
}  // namespace lomo
