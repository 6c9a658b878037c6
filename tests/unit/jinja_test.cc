#include "worker/data/jinja.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "worker/data/jsonl_record.h"
#include "worker/data/tokenizer.h"

namespace lomo::jinja {
namespace {

using json = nlohmann::ordered_json;
using ::testing::AllOf;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

const fs::path kTemplates = fs::path(LOMO_TEST_DATA_DIR) / "chat_templates";

std::string read_text(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path.string());
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

std::string render(std::string_view source, const json& context = json::object()) {
  return Template(source, "test").render(context);
}

std::string error_of(std::string_view source, const json& context = json::object()) {
  try {
    render(source, context);
  } catch (const TemplateError& error) {
    return error.what();
  }
  ADD_FAILURE() << "no TemplateError for " << source;
  return {};
}

// Parity with jinja2 in transformers' environment (scripts/make_chat_template_fixtures.py):
// the templates of Llama 3 and 3.1, Mistral, Qwen2.5, ChatML, Gemma and Phi-3, and one that
// exercises the rest of the subset, each over conversations, tools and role-order errors.
TEST(JinjaParityTest, EveryFixtureRendersAsJinja2RendersIt) {
  const json fixtures = json::parse(read_text(kTemplates / "fixtures.json"));
  ASSERT_GT(fixtures.at("cases").size(), 100u);
  size_t errors = 0;
  for (const json& c : fixtures.at("cases")) {
    const std::string name = c.at("template").get<std::string>();
    const Template tmpl(read_text(kTemplates / name), name);
    if (c.contains("error")) {
      ++errors;
      try {
        tmpl.render(c.at("context"));
        ADD_FAILURE() << name << " rendered where jinja2 raised: " << c.at("error");
      } catch (const TemplateError& error) {
        EXPECT_THAT(error.what(), AllOf(HasSubstr("chat template " + name + ":"),
                                        HasSubstr(c.at("error").get<std::string>())));
      }
      continue;
    }
    EXPECT_EQ(tmpl.render(c.at("context")), c.at("rendered").get<std::string>())
        << name << " with " << c.at("context").dump();
  }
  EXPECT_GT(errors, 5u);
}

TEST(JinjaTest, TrimAndLstripBlocksAsTransformersSetsThem) {
  // trim_blocks drops the newline after a block tag; lstrip_blocks the indent before one.
  EXPECT_EQ(render("a\n  {% if true %}\n  b\n  {% endif %}\nc"), "a\n  b\nc");
  // Expressions are left alone; "-" strips all white space on its side; "+" keeps the indent.
  EXPECT_EQ(render("  {{ 'x' }}\n  {{- 'y' -}}  \n z"), "  xyz");
  EXPECT_EQ(render("  {%+ if true %}x{% endif %}"), "  x");
  EXPECT_EQ(render("a {# note #}\nb"), "a b");
}

TEST(JinjaTest, ValuesPrintAsPythonPrintsThem) {
  EXPECT_EQ(
      render("{{ none }} {{ true }} {{ 1.0 }} {{ 2.50 }} {{ [1, 'a', none] }} {{ {'k': 1} }}"),
      "None True 1.0 2.5 [1, 'a', None] {'k': 1}");
  EXPECT_EQ(render("{{ x }}|{{ x.y is defined if x is defined }}", {{"z", 1}}), "|");
}

TEST(JinjaTest, StringMethodsAreSubsetsOfPythons) {
  EXPECT_EQ(render("[{{ '  a  '.lstrip() }}|{{ '  a  '.rstrip() }}|{{ '\xE3\x80\x80x\n'.strip() }}|"
                   "{{ 'xxaxx'.strip('x') }}|{{ '   '.rstrip() }}]"),
            "[a  |  a|x|a|]");
  EXPECT_EQ(render("{{ 'a,b,,c'.split(',') }} {{ ' a  b '.split() }} {{ 'ab'.startswith('a') }}"),
            "['a', 'b', '', 'c'] ['a', 'b'] True");
  EXPECT_EQ(render("{{ 'hello wORLD'|title }} {{ 'éa'|upper }} {{ 'x-y'|capitalize }}"),
            "Hello World ÉA X-y");
}

TEST(JinjaTest, ScopesFollowJinjaLoopsDoNotLeakButNamespacesDo) {
  EXPECT_EQ(render("{% set a = 1 %}{% for i in [1, 2] %}{% set a = i %}{% endfor %}{{ a }}"), "1");
  EXPECT_EQ(render("{% set ns = namespace(a=1) %}{% for i in [1, 2] %}{% set ns.a = i %}"
                   "{% endfor %}{{ ns.a }}"),
            "2");
  EXPECT_EQ(render("{% if true %}{% set a = 3 %}{% endif %}{{ a }}"), "3");
}

// Macros and block sets beyond what macros.jinja's parity cases cover: argument binding as
// Python binds it, Jinja's scoping, and the errors.
TEST(JinjaTest, MacrosBindArgumentsAndScopeAsJinjaDoes) {
  EXPECT_EQ(render("{% macro m(a, b='B', c=a ~ '!') %}{{ a }}{{ b }}{{ c }}{% endmacro %}"
                   "{{ m(1) }} {{ m(1, 2) }} {{ m(1, c=3) }} {{ m(a='x', b='y') }}"),
            "1B1! 121! 1B3 xyx!");
  // Globals as they are at the call; the caller's locals are not seen.
  EXPECT_EQ(render("{% set x = 1 %}{% macro f() %}{{ x }}{{ i }}{% endmacro %}{% set x = 2 %}"
                   "{% for i in [7] %}{{ f() }}{% endfor %}"),
            "2");
  // A macro's own sets stay inside it; a block set captures its rendered text (trim_blocks and
  // lstrip_blocks apply inside it as anywhere).
  EXPECT_EQ(render("{% set y = 'out' %}{% macro g() %}{% set y = 'in' %}{{ y }}{% endmacro %}"
                   "{{ g() }}{{ y }}"),
            "inout");
  EXPECT_EQ(
      render("{% set s %}\n  {% for i in [1, 2] %}{{ i }}{% endfor %}\n{% endset %}[{{ s }}]"),
      "[12]");
  EXPECT_THAT(error_of("{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}"),
              HasSubstr("macro 'm' takes not more than 1 argument(s)"));
  EXPECT_THAT(error_of("{% macro m(a) %}{% endmacro %}{{ m(b=1) }}"),
              HasSubstr("macro 'm' takes no keyword argument 'b'"));
  EXPECT_THAT(error_of("{% macro m(a) %}{% endmacro %}{{ m(1, a=2) }}"),
              HasSubstr("macro 'm' takes no keyword argument 'a'"));
  EXPECT_THAT(error_of("{% macro m(a=1, b) %}{% endmacro %}"),
              HasSubstr("a parameter without a default follows one with a default"));
  EXPECT_THAT(error_of("{% macro r() %}{{ r() }}{% endmacro %}{{ r() }}"),
              HasSubstr("macro calls nested deeper than 64"));
  EXPECT_THAT(error_of("{% macro r(n) %}{% if n > 0 %}{{ r(n - 1) }}{{ r(n - 1) }}{% endif %}"
                       "{% endmacro %}{{ r(40) }}"),
              HasSubstr("more than 100000 macro calls in one rendering"));
  EXPECT_THAT(error_of("{% for i in [1] %}{% set s %}{% break %}{% endset %}{% endfor %}"),
              HasSubstr("break or continue inside a {% set %} block"));
  EXPECT_THAT(error_of("{% set s | upper %}x{% endset %}"), HasSubstr("expected '=' or '%}'"));
  EXPECT_THAT(error_of("{% set s %}never closed"), HasSubstr("missing {% endset %}"));
}

TEST(JinjaTest, ErrorsNameTheTemplateLineAndColumn) {
  EXPECT_THAT(error_of("line one\n  {% if x %}never closed"),
              AllOf(HasSubstr("chat template test:"), HasSubstr("missing {% endif %}")));
  EXPECT_THAT(error_of("ok\n{{ 'a' + }}"),
              HasSubstr("chat template test:2:10: expected an expression"));
  EXPECT_THAT(error_of("{% call m() %}{% endcall %}"),
              HasSubstr("test:1:4: unsupported statement 'call'"));
  EXPECT_THAT(error_of("\n\n   {{ 'x' | wordwrap }}"),
              HasSubstr("test:3:11: unsupported filter 'wordwrap'"));
  EXPECT_THAT(error_of("{{ raise_exception('Roles must alternate') }}"),
              HasSubstr("test:1:4: raise_exception: Roles must alternate"));
  EXPECT_THAT(error_of("{{ messages[0].role }}", {{"messages", json::array()}}),
              HasSubstr("is undefined"));
  EXPECT_THAT(error_of("{{ 'unterminated }}"), HasSubstr("unterminated string"));
  EXPECT_THAT(error_of("{{ x "), HasSubstr("unclosed tag"));
}

// ---------------------------------------------------------------------------------------------
// The model's own template in training: data.chat_template auto.

const fs::path kTokenizers = fs::path(LOMO_TEST_DATA_DIR) / "tokenizers";

constexpr const char* kConversation =
    R"({"messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": " Hello! "},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]})";

// A model directory: a test tokenizer (llama3_style unless named), its tokenizer_config.json
// given `template`.
class ModelDir {
 public:
  explicit ModelDir(const std::string& chat_template, const std::string& style = "llama3_style") {
    path_ = fs::temp_directory_path() /
            ("lomo_jinja_test_" + std::to_string(::getpid()) + "_" + std::to_string(next_++));
    fs::create_directories(path_);
    fs::copy_file(kTokenizers / style / "tokenizer.json", path_ / "tokenizer.json");
    nlohmann::json config =
        nlohmann::json::parse(read_text(kTokenizers / style / "tokenizer_config.json"));
    if (!chat_template.empty()) config["chat_template"] = chat_template;
    std::ofstream(path_ / "tokenizer_config.json") << config.dump();
  }
  ~ModelDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  static inline int next_ = 0;
  fs::path path_;
};

std::string trainable_text(const TokenSample& sample, const Tokenizer& tokenizer) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < sample.ids.size(); ++i) {
    if (sample.trainable[i]) ids.push_back(sample.ids[i]);
  }
  return tokenizer.decode(ids);
}

TEST(ModelChatTemplateTest, Llama3sOwnTemplateGivesTheBuiltInLlama3SampleTokenForToken) {
  const ModelDir dir(read_text(kTemplates / "llama3.jinja"));
  const std::unique_ptr<Tokenizer> t = load_tokenizer(dir.path());
  ASSERT_TRUE(t->chat_template().has_value());
  const TokenSample own =
      RecordParser(*t, {DataFormat::kChat, std::nullopt, false}).sample(kConversation);
  const TokenSample built_in =
      RecordParser(*t, {DataFormat::kChat, ChatTemplate::kLlama3, false}).sample(kConversation);
  EXPECT_EQ(own.ids, built_in.ids);
  EXPECT_EQ(own.trainable, built_in.trainable);
  EXPECT_EQ(trainable_text(own, *t), "Hello!<|eot_id|>4<|eot_id|>");
}

TEST(ModelChatTemplateTest, MasksCoverExactlyWhatEachAssistantTurnAdds) {
  // ChatML closes a turn with <|im_end|> and a newline: both belong to the assistant's turn.
  const ModelDir dir(read_text(kTemplates / "chatml.jinja"));
  const std::unique_ptr<Tokenizer> t = load_tokenizer(dir.path());
  const TokenSample sample =
      RecordParser(*t, {DataFormat::kChat, std::nullopt, false}).sample(kConversation);
  EXPECT_EQ(trainable_text(sample, *t), " Hello! <|im_end|>\n4<|im_end|>\n");
  EXPECT_EQ(t->decode(sample.ids),
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4<|im_end|>\n");
  // train_on_prompt trains on everything but the first token, as with the built-in templates.
  const TokenSample all =
      RecordParser(*t, {DataFormat::kChat, std::nullopt, true}).sample(kConversation);
  EXPECT_EQ(all.ids, sample.ids);
  EXPECT_EQ(trainable_text(all, *t), t->decode(sample.ids));
}

// tests/data/generation/sp_chat: a SentencePiece-style tokenizer.json (Metaspace "first", byte
// fallback) with Mistral's template, and the ids transformers' apply_chat_template(tokenize=True)
// gives a conversation (scripts/make_generation_fixtures.py).
TEST(ModelChatTemplateTest, SentencePieceStyleTokenizerGivesTransformersIdsAndAssistantMasks) {
  const fs::path dir = fs::path(LOMO_TEST_DATA_DIR) / "generation" / "sp_chat";
  const json expected = json::parse(read_text(dir / "expected.json"))["training"];
  const std::unique_ptr<Tokenizer> t = load_tokenizer(dir);
  ASSERT_TRUE(t->chat_template().has_value());
  const TokenSample sample = RecordParser(*t, {DataFormat::kChat, std::nullopt, false})
                                 .sample(json{{"messages", expected["messages"]}}.dump());
  EXPECT_EQ(sample.ids, expected["ids"].get<std::vector<int32_t>>());
  EXPECT_EQ(t->decode(sample.ids), expected["text"]);
  // Mistral's template gives each answer as " " + content + eos_token; the decoder drops the
  // first space of what it decodes.
  EXPECT_EQ(trainable_text(sample, *t), "Hello! I'm here.</s> 4, of course</s>");
}

// A directory with only tokenizer.model (SentencePiece) and a tokenizer_config.json holding
// Mistral's template: the ids transformers' apply_chat_template gives (tests/data/llama2_tokenizer/
// special_text_vectors.json): "<s>" and "</s>" the template writes are BOS and EOS, and no piece
// after the first gains a dummy-prefix "▁".
TEST(ModelChatTemplateTest, ATokenizerModelGivesTransformersIdsForTheModelsTemplate) {
  const fs::path data(LOMO_TEST_DATA_DIR);
  const json vectors =
      json::parse(read_text(data / "llama2_tokenizer" / "special_text_vectors.json"));
  const fs::path dir =
      fs::temp_directory_path() / ("lomo_jinja_test_spm_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  fs::copy_file(data / "llama2_tokenizer" / "tokenizer.model", dir / "tokenizer.model",
                fs::copy_options::overwrite_existing);
  fs::copy_file(data / "generation" / "sp_chat" / "tokenizer_config.json",
                dir / "tokenizer_config.json", fs::copy_options::overwrite_existing);
  const std::unique_ptr<Tokenizer> t = load_tokenizer(dir);
  ASSERT_TRUE(t->chat_template().has_value());
  ASSERT_FALSE(vectors["chats"].empty());
  for (const json& chat : vectors["chats"]) {
    const TokenSample sample = RecordParser(*t, {DataFormat::kChat, std::nullopt, false})
                                   .sample(json{{"messages", chat["messages"]}}.dump());
    EXPECT_EQ(sample.ids, chat["ids"].get<std::vector<int32_t>>()) << chat["text"];
    EXPECT_EQ(sample.ids, t->encode(chat["text"].get<std::string>())) << chat["text"];
  }
  fs::remove_all(dir);
}

// Pieces of one rendering encode as the whole does, even where an answer follows "[/INST]"
// without a space (Mistral v0.3's layout): no "▁" of a dummy prefix at the start of a piece.
TEST(ModelChatTemplateTest, SentencePieceStylePiecesEncodeAsTheWholeRendering) {
  const std::string source =
      "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}"
      "[/INST]{% else %}{{ m.content + eos_token }}{% endif %}{% endfor %}";
  const json messages = json::parse(R"([{"role": "user", "content": "Hi there"},
      {"role": "assistant", "content": "Hello! I'm here."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}])");
  const std::string rendered = render(source, {{"messages", messages},
                                               {"bos_token", "<s>"},
                                               {"eos_token", "</s>"},
                                               {"add_generation_prompt", false}});
  for (const char* style : {"sp_legacy_style", "metaspace_first_style", "metaspace_always_style",
                            "metaspace_never_style"}) {
    const ModelDir dir(source, style);
    const std::unique_ptr<Tokenizer> t = load_tokenizer(dir.path());
    const TokenSample sample = RecordParser(*t, {DataFormat::kChat, std::nullopt, false})
                                   .sample(json{{"messages", messages}}.dump());
    EXPECT_EQ(sample.ids, t->encode(rendered)) << style;
    EXPECT_EQ(t->decode(sample.ids), t->decode(t->encode(rendered))) << style;
  }
}

TEST(ModelChatTemplateTest, TemplateErrorsAreRecordErrorsAndBadTemplatesNameTheirFile) {
  const ModelDir gemma(read_text(kTemplates / "gemma.jinja"));
  const std::unique_ptr<Tokenizer> t = load_tokenizer(gemma.path());
  const RecordParser parser(*t, {DataFormat::kChat, std::nullopt, false});
  try {
    parser.sample(kConversation);
    ADD_FAILURE() << "Gemma's template refuses a system message";
  } catch (const RecordError& error) {
    EXPECT_EQ(error.field(), "messages");
    EXPECT_THAT(error.what(), HasSubstr("System role not supported"));
  }
  // Rendering messages in reverse: a prefix of the conversation is not a prefix of the text.
  const ModelDir reversed("{% for m in messages[::-1] %}{{ m.content }}{% endfor %}");
  const std::unique_ptr<Tokenizer> r = load_tokenizer(reversed.path());
  try {
    RecordParser(*r, {DataFormat::kChat, std::nullopt, false}).sample(kConversation);
    ADD_FAILURE() << "masks of a non-prefix template";
  } catch (const RecordError& error) {
    EXPECT_EQ(error.field(), "messages[2]");
  }
  const ModelDir broken("{% for m in messages %}");
  const std::unique_ptr<Tokenizer> b = load_tokenizer(broken.path());
  try {
    [[maybe_unused]] const RecordParser parser(*b, {DataFormat::kChat, std::nullopt, false});
    ADD_FAILURE() << "a broken template";
  } catch (const std::invalid_argument& error) {
    EXPECT_THAT(error.what(), AllOf(HasSubstr("tokenizer_config.json chat_template:1:"),
                                    HasSubstr("missing {% endfor %}")));
  }
  const ModelDir none("");
  const std::unique_ptr<Tokenizer> n = load_tokenizer(none.path());
  EXPECT_FALSE(n->chat_template().has_value());
  try {
    [[maybe_unused]] const RecordParser parser(*n, {DataFormat::kChat, std::nullopt, false});
    ADD_FAILURE() << "auto without a template";
  } catch (const std::invalid_argument& error) {
    EXPECT_THAT(error.what(), HasSubstr("has no chat_template"));
  }
}

}  // namespace
}  // namespace lomo::jinja
