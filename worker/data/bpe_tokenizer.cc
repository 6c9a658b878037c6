#include "worker/data/bpe_tokenizer.h"

#include <algorithm>
#include <array>
#include <deque>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <queue>
#include <span>
#include <stdexcept>
#include <unordered_map>
#include <utility>

#include "common/read_file.h"
#include "worker/data/normalizer.h"
#include "worker/data/split_pattern.h"
#include "worker/data/token_decoder.h"
#include "worker/data/unicode_text.h"

namespace lomo {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// GPT-2's byte-to-unicode table: every byte becomes a printable character, so that a byte-level
// token is a readable string. Printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100 onwards in byte order.

struct ByteLevelAlphabet {
  std::array<uint32_t, 256> char_of_byte{};
  std::array<int16_t, 512> byte_of_char{};  // -1: not a byte-level character
};

constexpr ByteLevelAlphabet make_byte_level_alphabet() {
  ByteLevelAlphabet alphabet;
  for (int16_t& b : alphabet.byte_of_char) b = -1;
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const uint32_t c = printable ? b : next++;
    alphabet.char_of_byte[b] = c;
    alphabet.byte_of_char[c] = static_cast<int16_t>(b);
  }
  return alphabet;
}
constexpr ByteLevelAlphabet kByteLevel = make_byte_level_alphabet();

// The bytes a token made of byte-level characters stands for; nullopt if any character is not
// one (added tokens such as "<|eot_id|>" are, by luck of printable ASCII; others need not be).
std::optional<std::string> byte_level_decode(std::string_view token) {
  std::string bytes;
  for (size_t at = 0; at < token.size();) {
    const Utf8Char c = decode_utf8(token, at);
    if (c.code_point >= kByteLevel.byte_of_char.size() ||
        kByteLevel.byte_of_char[c.code_point] < 0) {
      return std::nullopt;
    }
    bytes += static_cast<char>(kByteLevel.byte_of_char[c.code_point]);
    at += c.length;
  }
  return bytes;
}

// A byte-fallback token: "<0xC3>" (the library's format!("<{:#04X}>")).
std::string hex_byte_token(uint8_t byte) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  return std::string("<0x") + kHex[byte >> 4] + kHex[byte & 15] + ">";
}

// Hash maps keyed by std::string that string_views can look up without a copy.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// A leftmost-longest matcher over a set of strings: a byte trie walked from each position.
class TokenMatcher {
 public:
  void add(std::string_view content, int32_t id) {
    uint32_t node = 0;
    for (const char ch : content) {
      const auto byte = static_cast<uint8_t>(ch);
      uint32_t child = 0;
      for (const auto& [b, index] : nodes_[node].children) {
        if (b == byte) child = index;
      }
      if (child == 0) {
        child = static_cast<uint32_t>(nodes_.size());
        nodes_[node].children.emplace_back(byte, child);
        nodes_.emplace_back();
      }
      node = child;
    }
    nodes_[node].id = id;
    first_byte_[static_cast<uint8_t>(content[0])] = true;
  }

  bool empty() const { return nodes_.size() == 1; }

  // The longest string starting at text[at]: its id and length; length 0 when none matches.
  std::pair<int32_t, size_t> longest_at(std::string_view text, size_t at) const {
    std::pair<int32_t, size_t> best{-1, 0};
    if (!first_byte_[static_cast<uint8_t>(text[at])]) return best;
    uint32_t node = 0;
    for (size_t i = at; i < text.size(); ++i) {
      const auto byte = static_cast<uint8_t>(text[i]);
      uint32_t child = 0;
      for (const auto& [b, index] : nodes_[node].children) {
        if (b == byte) child = index;
      }
      if (child == 0) break;
      node = child;
      if (nodes_[node].id >= 0) best = {nodes_[node].id, i + 1 - at};
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<uint8_t, uint32_t>> children;  // (byte, node index); few per node
    int32_t id = -1;
  };
  std::vector<Node> nodes_ = std::vector<Node>(1);
  std::array<bool, 256> first_byte_{};
};

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool normalized = true;
  bool lstrip = false;
  bool rstrip = false;
};

// What a Split step does with the matches of its pattern (SplitDelimiterBehavior).
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// When Metaspace puts its replacement character in front of a piece that does not start with
// one: always, only where the text starts (not after an added token), or never.
enum class PrependScheme { kAlways, kFirst, kNever };

// One step of the pre-tokenizer: a Split by a regex (Whitespace is one too), WhitespaceSplit,
// Metaspace, or the final ByteLevel.
struct PreTokenizerStep {
  enum class Kind { kSplit, kWhitespaceSplit, kMetaspace, kByteLevel };
  Kind kind = Kind::kByteLevel;
  std::shared_ptr<const TokenizerRegex> regex;  // kSplit
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel only
  bool use_regex = false;         // ByteLevel only: also split by the GPT-2 pattern
  std::string replacement;        // Metaspace only: the character that stands for a space
  PrependScheme prepend = PrependScheme::kAlways;  // Metaspace only
  bool split = true;  // Metaspace only: each replacement character starts a new piece
};

struct MergeRule {
  uint32_t rank;
  int32_t new_id;
};

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

}  // namespace

struct BpeTokenizer::Model {
  // Byte-level BPE (the pre-tokenizer ends in ByteLevel): tokens spell bytes in byte-level
  // characters. Otherwise tokens are text pieces (SentencePiece style: "▁the"), a character
  // without a token falls back to the "<0xXX>" tokens of its UTF-8 bytes, and `decoder` decodes.
  bool byte_level = true;
  // The model vocabulary by token text (byte-level characters).
  StringMap vocab;
  // The model vocabulary by raw bytes, for tokens made only of byte-level characters: pre-tokenized
  // text is looked up here without mapping it to characters first.
  StringMap vocab_by_bytes;
  std::array<int32_t, 256> byte_ids{};             // the token of each single byte, or -1
  std::unordered_map<uint64_t, MergeRule> merges;  // pair_key(left, right) -> rule
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;
  bool ignore_merges = false;
  // byte_fallback: for each byte whose byte-level character is not in the vocabulary, the
  // "<0xXX>" tokens of that character's UTF-8 bytes (the library falls back per character, and
  // after ByteLevel a character stands for one byte); empty when any of them is missing too.
  bool byte_fallback = false;
  std::array<std::vector<int32_t>, 256> fallback_ids;
  std::array<int32_t, 256> hex_byte_ids{};  // text pieces: the "<0xXX>" token of each byte, or -1
  std::vector<DecoderStep> decoder;         // text pieces
  // Text pieces: every encode() starts its text with a word-start marker (a Prepend normalizer,
  // or Metaspace prepending), as SentencePiece's dummy prefix does.
  bool adds_dummy_prefix = false;

  std::vector<NormalizerStep> normalizer;
  std::vector<PreTokenizerStep> pre_tokenizer;
  std::shared_ptr<const TokenizerRegex> gpt2_regex;  // ByteLevel's use_regex split

  std::unordered_map<int32_t, AddedToken> added_by_id;
  StringMap added_by_content;
  TokenMatcher raw_matcher;         // normalized=false tokens: matched first
  TokenMatcher normalized_matcher;  // normalized=true tokens: matched in what is left

  std::unordered_map<int32_t, std::string> token_of_id;  // added tokens take precedence
  std::unordered_map<int32_t, std::string> bytes_of_id;  // what the ByteLevel decoder makes of it
  int64_t vocab_size = 0;
};

namespace {

// ---------------------------------------------------------------------------------------------
// Parsing tokenizer.json. Every error names the file and the field (a JSON path).

class Parser {
 public:
  explicit Parser(std::string source) : source_(std::move(source)) {}

  std::unique_ptr<BpeTokenizer::Model> parse(std::string_view json_text) {
    json root;
    try {
      root = json::parse(json_text.begin(), json_text.end());
    } catch (const json::exception& error) {
      throw std::invalid_argument(source_ + ": not valid JSON: " + error.what());
    }
    if (!root.is_object()) fail("(root)", "expected an object, found " + type_of(root));
    auto model = std::make_unique<BpeTokenizer::Model>();
    if (const json* version = member(root, "version")) {
      if (!version->is_string() || version->get<std::string>() != "1.0") {
        fail("version", "unsupported version " + version->dump() + " (expected \"1.0\")");
      }
    }
    if (const json* normalizer = member(root, "normalizer"); normalizer && !normalizer->is_null()) {
      parse_normalizer(*normalizer, "normalizer", *model);
    }
    // The pre-tokenizer first: whether it ends in ByteLevel decides how the vocabulary reads.
    if (const json* pre = member(root, "pre_tokenizer"); pre && !pre->is_null()) {
      parse_pre_tokenizer(*pre, *model);
    } else {
      model->byte_level = false;  // the model sees each normalized section whole
    }
    parse_model(required(root, "model", "model"), *model);
    parse_decoder(required(root, "decoder", "decoder"), *model);
    model->adds_dummy_prefix = !model->byte_level && adds_dummy_prefix(*model);
    if (const json* added = member(root, "added_tokens"); added && !added->is_null()) {
      parse_added_tokens(*added, *model);
    }
    build_decoding(*model);
    return model;
  }

 private:
  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw std::invalid_argument(source_ + ": " + field + ": " + what);
  }

  static std::string type_of(const json& value) { return value.type_name(); }

  // "\"NFC\"" for {"type": "NFC", ...}, else the JSON type.
  static std::string describe_type(const json& value) {
    if (value.is_object()) {
      if (const json* type = member(value, "type"); type && type->is_string()) return type->dump();
    }
    return type_of(value);
  }

  static const json* member(const json& object, const char* key) {
    const auto it = object.find(key);
    return it == object.end() ? nullptr : &*it;
  }

  const json& required(const json& object, const char* key, const std::string& field) const {
    const json* value = member(object, key);
    if (value == nullptr) fail(field, "missing");
    return *value;
  }

  const json& required_object(const json& object, const char* key, const std::string& field) const {
    const json& value = required(object, key, field);
    if (!value.is_object()) fail(field, "expected an object, found " + type_of(value));
    return value;
  }

  // A bool that may be absent or null (nullopt then).
  std::optional<bool> optional_bool(const json& object, const char* key,
                                    const std::string& field) const {
    const json* value = member(object, key);
    if (value == nullptr || value->is_null()) return std::nullopt;
    if (!value->is_boolean()) fail(field, "expected true or false, found " + type_of(*value));
    return value->get<bool>();
  }

  std::optional<std::string> optional_string(const json& object, const char* key,
                                             const std::string& field) const {
    const json* value = member(object, key);
    if (value == nullptr || value->is_null()) return std::nullopt;
    if (!value->is_string()) fail(field, "expected a string, found " + type_of(*value));
    return value->get<std::string>();
  }

  std::string required_string(const json& object, const char* key, const std::string& field) const {
    std::optional<std::string> value = optional_string(object, key, field);
    if (!value) fail(field, "missing");
    return *value;
  }

  int32_t token_id(const json& value, const std::string& field) const {
    // nlohmann stores every non-negative integer as unsigned.
    if (!value.is_number_unsigned()) {
      fail(field, "expected a token id (an integer >= 0), found " + value.dump());
    }
    const uint64_t id = value.get<uint64_t>();
    if (id > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
      fail(field, "token id " + std::to_string(id) + " does not fit in int32");
    }
    return static_cast<int32_t>(id);
  }

  void parse_model(const json& model_json, BpeTokenizer::Model& model) const {
    if (!model_json.is_object()) fail("model", "expected an object, found " + type_of(model_json));
    const std::optional<std::string> type = optional_string(model_json, "type", "model.type");
    if (!type) fail("model.type", "missing (lomo supports \"BPE\")");
    if (*type != "BPE") {
      fail("model.type", "unsupported model type \"" + *type + "\" (lomo supports \"BPE\")");
    }

    if (const json* dropout = member(model_json, "dropout"); dropout && !dropout->is_null()) {
      if (!dropout->is_number() || dropout->get<double>() != 0.0) {
        fail("model.dropout", "BPE dropout " + dropout->dump() +
                                  " is not supported (lomo tokenizes deterministically)");
      }
    }
    model.byte_fallback =
        optional_bool(model_json, "byte_fallback", "model.byte_fallback").value_or(false);
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      const std::string field = std::string("model.") + key;
      if (!optional_string(model_json, key, field).value_or("").empty()) {
        fail(field, "not supported by lomo's BPE");
      }
    }
    model.fuse_unk = optional_bool(model_json, "fuse_unk", "model.fuse_unk").value_or(false);
    model.ignore_merges =
        optional_bool(model_json, "ignore_merges", "model.ignore_merges").value_or(false);

    const json& vocab = required_object(model_json, "vocab", "model.vocab");
    model.vocab.reserve(vocab.size());
    std::unordered_map<int32_t, const std::string*> token_of_id;
    token_of_id.reserve(vocab.size());
    for (const auto& [token, id_json] : vocab.items()) {
      const int32_t id = token_id(id_json, "model.vocab[\"" + token + "\"]");
      const auto [it, inserted] = model.vocab.emplace(token, id);
      const auto [other, fresh] = token_of_id.emplace(id, &it->first);
      if (!fresh) {
        fail("model.vocab", "tokens \"" + *other->second + "\" and \"" + token + "\" share id " +
                                std::to_string(id));
      }
      model.vocab_size = std::max<int64_t>(model.vocab_size, int64_t{id} + 1);
      if (!model.byte_level) continue;
      if (std::optional<std::string> bytes = byte_level_decode(token)) {
        model.vocab_by_bytes.emplace(std::move(*bytes), id);
      }
    }
    for (int b = 0; b < 256 && !model.byte_level; ++b) {
      const auto it = model.vocab.find(hex_byte_token(static_cast<uint8_t>(b)));
      model.hex_byte_ids[static_cast<size_t>(b)] = it == model.vocab.end() ? -1 : it->second;
    }
    for (int b = 0; b < 256 && model.byte_level; ++b) {
      const auto it = model.vocab_by_bytes.find(std::string(1, static_cast<char>(b)));
      model.byte_ids[static_cast<size_t>(b)] = it == model.vocab_by_bytes.end() ? -1 : it->second;
      if (model.byte_fallback) {
        model.fallback_ids[static_cast<size_t>(b)] =
            fallback_tokens(model, static_cast<uint8_t>(b));
      }
    }

    if (const std::optional<std::string> unk =
            optional_string(model_json, "unk_token", "model.unk_token")) {
      // The tokenizers library reports a missing unk token only when it first needs it; a file
      // that names one it does not have is broken either way.
      const auto it = model.vocab.find(*unk);
      if (it == model.vocab.end()) {
        fail("model.unk_token", "\"" + *unk + "\" is not in model.vocab");
      }
      model.unk_id = it->second;
    }
    parse_merges(required(model_json, "merges", "model.merges"), model);
  }

  // The "<0xXX>" tokens of the UTF-8 bytes of byte b's byte-level character, or nothing when one
  // is missing.
  static std::vector<int32_t> fallback_tokens(const BpeTokenizer::Model& model, uint8_t b) {
    std::string character;
    append_utf8(kByteLevel.char_of_byte[b], character);
    std::vector<int32_t> ids;
    for (const char ch : character) {
      const auto it = model.vocab.find(hex_byte_token(static_cast<uint8_t>(ch)));
      if (it == model.vocab.end()) return {};
      ids.push_back(it->second);
    }
    return ids;
  }

  void parse_normalizer(const json& normalizer, const std::string& field,
                        BpeTokenizer::Model& model) const {
    if (!normalizer.is_object()) fail(field, "expected an object, found " + type_of(normalizer));
    const std::string type = required_string(normalizer, "type", field + ".type");
    using Kind = NormalizerStep::Kind;
    if (type == "Sequence") {
      const json& steps = required(normalizer, "normalizers", field + ".normalizers");
      if (!steps.is_array()) fail(field + ".normalizers", "expected an array");
      for (size_t i = 0; i < steps.size(); ++i) {
        parse_normalizer(steps[i], field + ".normalizers[" + std::to_string(i) + "]", model);
      }
      return;
    }
    static const std::unordered_map<std::string, Kind> kForms = {{"NFC", Kind::kNfc},
                                                                 {"NFD", Kind::kNfd},
                                                                 {"NFKC", Kind::kNfkc},
                                                                 {"NFKD", Kind::kNfkd},
                                                                 {"Lowercase", Kind::kLowercase}};
    if (const auto it = kForms.find(type); it != kForms.end()) {
      model.normalizer.push_back({it->second, nullptr, {}});
    } else if (type == "Prepend") {
      model.normalizer.push_back(
          {Kind::kPrepend, nullptr, required_string(normalizer, "prepend", field + ".prepend")});
    } else if (type == "Replace") {
      model.normalizer.push_back({Kind::kReplace, parse_pattern(normalizer, field),
                                  required_string(normalizer, "content", field + ".content")});
    } else {
      fail(field + ".type", "unsupported normalizer \"" + type +
                                "\" (lomo supports NFC, NFD, NFKC, NFKD, Lowercase, Replace, "
                                "Prepend and Sequence)");
    }
  }

  // A {"String": ...} or {"Regex": ...} pattern, compiled.
  std::shared_ptr<const TokenizerRegex> parse_pattern(const json& owner,
                                                      const std::string& field) const {
    const json& pattern = required_object(owner, "pattern", field + ".pattern");
    try {
      if (member(pattern, "String")) {
        return TokenizerRegex::literal(
            required_string(pattern, "String", field + ".pattern.String"));
      }
      return std::make_shared<const TokenizerRegex>(
          required_string(pattern, "Regex", field + ".pattern.Regex"));
    } catch (const std::invalid_argument& error) {
      if (std::string_view(error.what()).starts_with(source_)) throw;
      fail(field + ".pattern.Regex", error.what());
    }
  }

  void parse_merges(const json& merges, BpeTokenizer::Model& model) const {
    if (!merges.is_array()) fail("model.merges", "expected an array, found " + type_of(merges));
    // Two spellings: ["a", "b"] pairs, or legacy "a b" strings (where lines starting with
    // "#version" are skipped and do not count towards ranks). One file uses one of them.
    const bool legacy = !merges.empty() && merges.front().is_string();
    model.merges.reserve(merges.size());
    uint32_t rank = 0;
    for (size_t i = 0; i < merges.size(); ++i) {
      const json& merge = merges[i];
      const std::string field = "model.merges[" + std::to_string(i) + "]";
      std::string left;
      std::string right;
      if (legacy) {
        if (!merge.is_string()) {
          fail(field, "expected a string like the first merge, found " + type_of(merge));
        }
        const std::string& line = merge.get_ref<const std::string&>();
        if (line.starts_with("#version")) continue;
        const size_t space = line.find(' ');
        if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
          fail(field, "\"" + line + "\" is not two tokens separated by one space");
        }
        left = line.substr(0, space);
        right = line.substr(space + 1);
      } else {
        if (!merge.is_array() || merge.size() != 2 || !merge[0].is_string() ||
            !merge[1].is_string()) {
          fail(field, "expected a pair of token strings, found " + merge.dump());
        }
        left = merge[0].get<std::string>();
        right = merge[1].get<std::string>();
      }
      const int32_t left_id = vocab_id(model, left, field);
      const int32_t right_id = vocab_id(model, right, field);
      const int32_t new_id = vocab_id(model, left + right, field);
      // As in the tokenizers library, a pair listed twice keeps its last rank.
      model.merges.insert_or_assign(pair_key(left_id, right_id), MergeRule{rank, new_id});
      ++rank;
    }
  }

  int32_t vocab_id(const BpeTokenizer::Model& model, const std::string& token,
                   const std::string& field) const {
    const auto it = model.vocab.find(token);
    if (it == model.vocab.end()) fail(field, "token \"" + token + "\" is not in model.vocab");
    return it->second;
  }

  void parse_pre_tokenizer(const json& pre_tokenizer, BpeTokenizer::Model& model) const {
    if (!pre_tokenizer.is_object()) {
      fail("pre_tokenizer", "expected an object or null, found " + type_of(pre_tokenizer));
    }
    const std::string type = required_string(pre_tokenizer, "type", "pre_tokenizer.type");
    if (type == "Sequence") {
      const json& steps = required(pre_tokenizer, "pretokenizers", "pre_tokenizer.pretokenizers");
      if (!steps.is_array()) {
        fail("pre_tokenizer.pretokenizers", "expected an array, found " + type_of(steps));
      }
      for (size_t i = 0; i < steps.size(); ++i) {
        model.pre_tokenizer.push_back(parse_pre_tokenizer_step(
            steps[i], "pre_tokenizer.pretokenizers[" + std::to_string(i) + "]"));
      }
    } else {
      model.pre_tokenizer.push_back(parse_pre_tokenizer_step(pre_tokenizer, "pre_tokenizer"));
    }
    // Byte-level BPE has the ByteLevel step once, last: before it, splits see the text; after it
    // they would see byte-level characters. Without one the vocabulary holds text pieces, which
    // Metaspace (spaces as "▁") serves and ByteLevel does not mix with.
    using Kind = PreTokenizerStep::Kind;
    const auto& steps = model.pre_tokenizer;
    model.byte_level = !steps.empty() && steps.back().kind == Kind::kByteLevel;
    for (size_t i = 0; i < steps.size(); ++i) {
      if (steps[i].kind == Kind::kByteLevel && i + 1 != steps.size()) {
        fail("pre_tokenizer",
             "lomo supports Split, Whitespace and WhitespaceSplit steps followed by one ByteLevel "
             "step, last");
      }
      if (steps[i].kind == Kind::kMetaspace && model.byte_level) {
        fail("pre_tokenizer", "Metaspace and ByteLevel in one pre-tokenizer are not supported");
      }
    }
    if (model.byte_level && steps.back().use_regex) {
      model.gpt2_regex = std::make_shared<const TokenizerRegex>(kGpt2SplitPattern);
    }
  }

  // Metaspace as the library reads it, for the pre-tokenizer and the decoder alike: prepend_scheme
  // defaults to "always", split to true, and the legacy add_prefix_space: false must come with
  // prepend_scheme "never" (the library refuses it otherwise, even without a prepend_scheme).
  void parse_metaspace(const json& step, const std::string& field, PreTokenizerStep& out) const {
    out.kind = PreTokenizerStep::Kind::kMetaspace;
    out.replacement = one_character(step, "replacement", field + ".replacement");
    const std::string scheme =
        optional_string(step, "prepend_scheme", field + ".prepend_scheme").value_or("always");
    static const std::unordered_map<std::string, PrependScheme> kSchemes = {
        {"always", PrependScheme::kAlways},
        {"first", PrependScheme::kFirst},
        {"never", PrependScheme::kNever}};
    const auto it = kSchemes.find(scheme);
    if (it == kSchemes.end()) {
      fail(field + ".prepend_scheme",
           "unknown prepend_scheme \"" + scheme + "\" (expected always, first or never)");
    }
    out.prepend = it->second;
    if (optional_bool(step, "add_prefix_space", field + ".add_prefix_space") == false &&
        out.prepend != PrependScheme::kNever) {
      fail(field + ".add_prefix_space",
           "false contradicts prepend_scheme \"" + scheme + "\" (write prepend_scheme \"never\")");
    }
    out.split = optional_bool(step, "split", field + ".split").value_or(true);
  }

  // A string of exactly one character (a Rust char in the library).
  std::string one_character(const json& object, const char* key, const std::string& field) const {
    std::string value = required_string(object, key, field);
    if (value.empty() || decode_utf8(value, 0).length != value.size()) {
      fail(field, "expected one character, found \"" + value + "\"");
    }
    return value;
  }

  PreTokenizerStep parse_pre_tokenizer_step(const json& step, const std::string& field) const {
    if (!step.is_object()) fail(field, "expected an object, found " + type_of(step));
    const std::string type = required_string(step, "type", field + ".type");
    PreTokenizerStep out;
    if (type == "ByteLevel") {
      const std::optional<bool> prefix =
          optional_bool(step, "add_prefix_space", field + ".add_prefix_space");
      if (!prefix) fail(field + ".add_prefix_space", "missing");
      out.add_prefix_space = *prefix;
      out.use_regex = optional_bool(step, "use_regex", field + ".use_regex").value_or(true);
      return out;
    }
    if (type == "WhitespaceSplit") {
      out.kind = PreTokenizerStep::Kind::kWhitespaceSplit;
      return out;
    }
    if (type == "Metaspace") {
      parse_metaspace(step, field, out);
      return out;
    }
    if (type == "Whitespace") {
      // The library's definition: the matches of \w+|[^\w\s]+, everything else removed.
      out.kind = PreTokenizerStep::Kind::kSplit;
      out.regex = std::make_shared<const TokenizerRegex>(R"(\w+|[^\w\s]+)");
      out.behavior = SplitBehavior::kRemoved;
      out.invert = true;
      return out;
    }
    if (type != "Split") {
      fail(field + ".type", "unsupported pre-tokenizer \"" + type +
                                "\" (lomo supports ByteLevel, Metaspace, Split, Whitespace, "
                                "WhitespaceSplit and a Sequence of them)");
    }
    out.kind = PreTokenizerStep::Kind::kSplit;
    out.regex = parse_pattern(step, field);
    static const std::unordered_map<std::string, SplitBehavior> kBehaviors = {
        {"Removed", SplitBehavior::kRemoved},
        {"Isolated", SplitBehavior::kIsolated},
        {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
        {"MergedWithNext", SplitBehavior::kMergedWithNext},
        {"Contiguous", SplitBehavior::kContiguous}};
    const std::string behavior = required_string(step, "behavior", field + ".behavior");
    const auto it = kBehaviors.find(behavior);
    if (it == kBehaviors.end()) {
      fail(field + ".behavior", "unknown split behavior \"" + behavior + "\"");
    }
    out.behavior = it->second;
    out.invert = optional_bool(step, "invert", field + ".invert").value_or(false);
    return out;
  }

  // Byte-level BPE decodes with ByteLevel only; text pieces with the steps of token_decoder.h.
  void parse_decoder(const json& decoder, BpeTokenizer::Model& model) const {
    if (!decoder.is_object()) fail("decoder", "expected an object, found " + type_of(decoder));
    const std::string type = required_string(decoder, "type", "decoder.type");
    if (model.byte_level) {
      if (type != "ByteLevel") {
        fail("decoder.type", "unsupported decoder \"" + type +
                                 "\" (with a ByteLevel pre-tokenizer lomo supports ByteLevel)");
      }
      return;
    }
    if (type == "ByteLevel") {
      fail("decoder.type",
           "the ByteLevel decoder needs a ByteLevel pre-tokenizer, and pre_tokenizer has none");
    }
    parse_decoder_step(decoder, "decoder", model.decoder);
  }

  void parse_decoder_step(const json& step, const std::string& field,
                          std::vector<DecoderStep>& out) const {
    if (!step.is_object()) fail(field, "expected an object, found " + type_of(step));
    const std::string type = required_string(step, "type", field + ".type");
    using Kind = DecoderStep::Kind;
    DecoderStep parsed;
    if (type == "Sequence") {
      const json& steps = required(step, "decoders", field + ".decoders");
      if (!steps.is_array()) {
        fail(field + ".decoders", "expected an array, found " + type_of(steps));
      }
      for (size_t i = 0; i < steps.size(); ++i) {
        parse_decoder_step(steps[i], field + ".decoders[" + std::to_string(i) + "]", out);
      }
      return;
    }
    if (type == "Replace") {
      parsed.kind = Kind::kReplace;
      parsed.pattern = parse_pattern(step, field);
      parsed.content = required_string(step, "content", field + ".content");
    } else if (type == "ByteFallback") {
      parsed.kind = Kind::kByteFallback;
    } else if (type == "Fuse") {
      parsed.kind = Kind::kFuse;
    } else if (type == "Strip") {
      parsed.kind = Kind::kStrip;
      parsed.content = one_character(step, "content", field + ".content");
      parsed.start = count(step, "start", field + ".start");
      parsed.stop = count(step, "stop", field + ".stop");
    } else if (type == "Metaspace") {
      PreTokenizerStep metaspace;
      parse_metaspace(step, field, metaspace);
      parsed.kind = Kind::kMetaspace;
      parsed.content = metaspace.replacement;
      parsed.first_token_unprefixed = metaspace.prepend != PrependScheme::kNever;
    } else {
      fail(field + ".type", "unsupported decoder \"" + type +
                                "\" (without a ByteLevel pre-tokenizer lomo supports Replace, "
                                "ByteFallback, Fuse, Strip, Metaspace and a Sequence of them)");
    }
    out.push_back(std::move(parsed));
  }

  // A required integer >= 0.
  size_t count(const json& object, const char* key, const std::string& field) const {
    const json& value = required(object, key, field);
    if (!value.is_number_unsigned()) fail(field, "expected an integer >= 0, found " + value.dump());
    return value.get<size_t>();
  }

  // Whether each encoded text starts with a word-start marker: a Prepend normalizer, or a
  // Metaspace that prepends.
  static bool adds_dummy_prefix(const BpeTokenizer::Model& model) {
    for (const NormalizerStep& step : model.normalizer) {
      if (step.kind == NormalizerStep::Kind::kPrepend) return true;
    }
    for (const PreTokenizerStep& step : model.pre_tokenizer) {
      if (step.kind == PreTokenizerStep::Kind::kMetaspace &&
          step.prepend != PrependScheme::kNever) {
        return true;
      }
    }
    return false;
  }

  // Ids as the tokenizers library assigns them when it loads the file (AddedVocabulary::
  // add_tokens): a token already in the model vocabulary keeps that id, a repeated one its first
  // id, any other takes the next id after the model vocabulary. The library only warns when the
  // file says otherwise; lomo refuses such a file rather than guess which id the model was
  // trained with.
  void parse_added_tokens(const json& tokens, BpeTokenizer::Model& model) const {
    if (!tokens.is_array()) fail("added_tokens", "expected an array, found " + type_of(tokens));
    auto next_id = static_cast<int64_t>(model.vocab.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
      const json& token = tokens[i];
      const std::string field = "added_tokens[" + std::to_string(i) + "]";
      if (!token.is_object()) fail(field, "expected an object, found " + type_of(token));
      AddedToken added;
      added.content = required_string(token, "content", field + ".content");
      const int32_t file_id = token_id(required(token, "id", field + ".id"), field + ".id");
      if (optional_bool(token, "single_word", field + ".single_word").value_or(false)) {
        fail(field + ".single_word", "single_word added tokens are not supported");
      }
      added.special = optional_bool(token, "special", field + ".special").value_or(false);
      added.normalized =
          optional_bool(token, "normalized", field + ".normalized").value_or(!added.special);
      added.lstrip = optional_bool(token, "lstrip", field + ".lstrip").value_or(false);
      added.rstrip = optional_bool(token, "rstrip", field + ".rstrip").value_or(false);
      if (added.content.empty()) continue;  // the library ignores empty tokens

      int64_t id;
      if (const auto it = model.added_by_content.find(added.content);
          it != model.added_by_content.end()) {
        id = it->second;
      } else if (const auto in_vocab = model.vocab.find(added.content);
                 in_vocab != model.vocab.end()) {
        id = in_vocab->second;
      } else {
        id = next_id++;
      }
      if (id != file_id) {
        fail(field + ".id", "\"" + added.content + "\" has id " + std::to_string(file_id) +
                                " but the tokenizers library would give it id " +
                                std::to_string(id) +
                                " (added tokens not in model.vocab must follow it in order)");
      }
      added.id = file_id;
      model.added_by_content.insert_or_assign(added.content, file_id);
      model.vocab_size = std::max<int64_t>(model.vocab_size, int64_t{file_id} + 1);
      // A repeated token replaces the earlier one's options, as in the library.
      model.added_by_id.insert_or_assign(file_id, std::move(added));
    }
    for (const auto& [id, added] : model.added_by_id) {
      if (!added.normalized) {
        model.raw_matcher.add(added.content, id);
        continue;
      }
      // The library looks for a normalized token in normalized text as the normalizer spells
      // it: "[NOTE]" under Lowercase and Prepend("_") is found only as "_[note]".
      const std::string pattern = normalize(model.normalizer, added.content);
      if (!pattern.empty()) model.normalized_matcher.add(pattern, id);
    }
  }

  static void build_decoding(BpeTokenizer::Model& model) {
    model.token_of_id.reserve(model.vocab.size() + model.added_by_id.size());
    for (const auto& [token, id] : model.vocab) model.token_of_id.emplace(id, token);
    for (const auto& [id, added] : model.added_by_id) {
      // The library names a normalized token by its normalized form (and decodes it so).
      model.token_of_id.insert_or_assign(
          id, added.normalized ? normalize(model.normalizer, added.content) : added.content);
    }
    // The ByteLevel decoder turns a token into bytes when all its characters are byte-level
    // ones, and keeps its UTF-8 text otherwise.
    if (!model.byte_level) return;
    model.bytes_of_id.reserve(model.token_of_id.size());
    for (const auto& [id, token] : model.token_of_id) {
      model.bytes_of_id.emplace(id, byte_level_decode(token).value_or(token));
    }
  }

  std::string source_;
};

// ---------------------------------------------------------------------------------------------
// Encoding.

// Scratch buffers reused across the words of one encode call.
struct Scratch {
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    uint32_t length;  // bytes; 0 marks a symbol merged into its left neighbour
  };
  struct Merge {
    uint32_t rank;
    uint32_t pos;
    int32_t new_id;
  };
  // Lowest rank first, then leftmost: the order of the tokenizers library's merge queue.
  struct LaterMerge {
    bool operator()(const Merge& a, const Merge& b) const {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    }
  };
  // Where a pre-tokenized piece begins, for prepending: where the whole text begins (the library:
  // offset 0 in the original text; Metaspace's "first" scheme prepends only there), where a
  // section between added tokens begins (a Prepend normalizer prepends there too), in the middle
  // of a section where a continuation begins (nothing is prepended), or elsewhere (after a split).
  enum class Start { kText, kSection, kContinuation, kOther };
  struct Piece {
    std::string_view text;
    Start start;
  };
  std::vector<Symbol> symbols;
  std::priority_queue<Merge, std::vector<Merge>, LaterMerge> queue;
  std::vector<Piece> pieces;
  std::vector<Piece> next_pieces;
  std::deque<std::string> rewritten;  // Metaspace's pieces: stable while `pieces` views them
  std::vector<std::string_view> words;
  std::string prefixed;
  std::vector<ByteRange> matches;
  std::vector<std::pair<ByteRange, bool>> parts;
};

class Encoder {
 public:
  using Start = Scratch::Start;

  // `start`: where the text's first section begins (kText for an ordinary encode; see
  // Tokenizer::encode_continuation for the others).
  Encoder(const BpeTokenizer::Model& model, std::vector<int32_t>& ids, Start start)
      : model_(model), ids_(ids), start_(start) {}

  void encode(std::string_view text) {
    if (text.empty()) return;
    // Added tokens come out first: those matched on the raw text, then, in each gap normalized
    // on its own, those matched on normalized text.
    split_added(text, model_.raw_matcher, [this, text](std::string_view gap) {
      const bool first_gap = gap.data() == text.data();
      const Start gap_start = first_gap ? start_ : Start::kSection;
      const bool section_start = gap_start != Start::kContinuation;
      const auto rest = [this, gap_start](std::string_view whole) {
        return [this, gap_start, whole](std::string_view segment) {
          encode_segment(segment, segment.data() == whole.data() ? gap_start : Start::kSection);
        };
      };
      if (model_.normalizer.empty()) {
        split_added(gap, model_.normalized_matcher, rest(gap));
      } else {
        const std::string normalized = normalize(model_.normalizer, gap, section_start);
        split_added(normalized, model_.normalized_matcher, rest(normalized));
      }
    });
  }

 private:
  // Emits the added tokens `matcher` finds in `text` and hands the text between them to `gap`,
  // following AddedVocabulary::find_matches: leftmost-longest matches, lstrip/rstrip widen a
  // match over adjacent whitespace, and the search resumes at the end of the match proper (so a
  // later match may overlap what rstrip took; the library then behaves as reproduced here).
  template <typename Gap>
  void split_added(std::string_view text, const TokenMatcher& matcher, const Gap& gap) {
    if (matcher.empty()) {
      gap(text);
      return;
    }
    size_t start_offset = 0;
    size_t at = 0;
    while (at < text.size()) {
      const auto [id, length] = matcher.longest_at(text, at);
      if (length == 0) {
        ++at;
        continue;
      }
      const AddedToken& token = model_.added_by_id.at(id);
      size_t start = at;
      size_t stop = at + length;
      if (token.lstrip) {
        start = std::max(start_of_trailing_space(text.substr(0, start)), start_offset);
      }
      if (token.rstrip) stop += leading_space_length(text.substr(stop));
      if (start_offset < start) gap(text.substr(start_offset, start - start_offset));
      // lstrip never reaches back over what an earlier rstrip took, which can leave a match with
      // nothing: the library then drops the token (and, where the span is inverted, panics).
      if (start < stop) ids_.push_back(id);
      start_offset = stop;
      at += length;
    }
    if (start_offset < text.size()) gap(text.substr(start_offset));
  }

  static size_t start_of_trailing_space(std::string_view text) {
    // Walk back over whole characters: find the start of each, then test it.
    size_t start = text.size();
    while (start > 0) {
      size_t char_start = start - 1;
      while (char_start > 0 && start - char_start < 4 &&
             (static_cast<uint8_t>(text[char_start]) & 0xC0) == 0x80) {
        --char_start;
      }
      const Utf8Char c = decode_utf8(text, char_start);
      if (char_start + c.length != start || !is_white_space(c.code_point)) break;
      start = char_start;
    }
    return start;
  }

  static size_t leading_space_length(std::string_view text) {
    size_t at = 0;
    while (at < text.size()) {
      const Utf8Char c = decode_utf8(text, at);
      if (!is_white_space(c.code_point)) break;
      at += c.length;
    }
    return at;
  }

  void encode_segment(std::string_view segment, Scratch::Start start) {
    std::vector<Scratch::Piece>& pieces = scratch_.pieces;
    pieces.assign(1, {segment, start});
    const size_t splitting_steps = model_.pre_tokenizer.size() - (model_.byte_level ? 1 : 0);
    for (size_t s = 0; s < splitting_steps; ++s) {
      scratch_.next_pieces.clear();
      for (const Scratch::Piece& piece : pieces) {
        pre_tokenize(model_.pre_tokenizer[s], piece, scratch_.next_pieces);
      }
      pieces.swap(scratch_.next_pieces);
    }
    if (!model_.byte_level) {
      for (const Scratch::Piece& piece : pieces) encode_word(piece.text);
      scratch_.rewritten.clear();
      return;
    }
    const PreTokenizerStep& byte_level = model_.pre_tokenizer.back();
    for (const Scratch::Piece& piece : pieces) {
      std::string_view text = piece.text;
      if (byte_level.add_prefix_space && text.front() != ' ') {
        scratch_.prefixed.assign(1, ' ');
        scratch_.prefixed.append(text);
        text = scratch_.prefixed;
      }
      if (byte_level.use_regex) {
        scratch_.words.clear();
        split_isolated(*model_.gpt2_regex, text, scratch_.words);
        for (const std::string_view word : scratch_.words) encode_word(word);
      } else {
        encode_word(text);
      }
    }
  }

  // Appends the non-empty pieces `step` makes of `piece` (the library drops empty ones).
  void pre_tokenize(const PreTokenizerStep& step, const Scratch::Piece& piece,
                    std::vector<Scratch::Piece>& out) {
    if (step.kind == PreTokenizerStep::Kind::kWhitespaceSplit) {
      split_on_white_space(piece, out);
      return;
    }
    if (step.kind == PreTokenizerStep::Kind::kMetaspace) {
      metaspace(step, piece, out);
      return;
    }
    const std::string_view text = piece.text;
    step.regex->find_all(text, scratch_.matches);
    // Pattern::find_matches: the matches and the gaps between them, in order.
    auto& parts = scratch_.parts;
    parts.clear();
    size_t previous = 0;
    for (const ByteRange& match : scratch_.matches) {
      if (previous != match.first) parts.push_back({{previous, match.first}, step.invert});
      parts.push_back({match, !step.invert});
      previous = match.second;
    }
    if (previous != text.size()) parts.push_back({{previous, text.size()}, step.invert});
    apply_behavior(step.behavior, parts);
    for (const auto& [range, remove] : parts) {
      if (!remove && range.first != range.second) {
        out.push_back(
            {text.substr(range.first, range.second - range.first), starts(piece, range.first)});
      }
    }
  }

  // Where the part of `piece` from `offset` on begins.
  static Scratch::Start starts(const Scratch::Piece& piece, size_t offset) {
    return offset == 0 ? piece.start : Scratch::Start::kOther;
  }

  // Spaces become the replacement character, which is prepended as the scheme says, and with
  // split each replacement character starts a new piece (MergedWithNext).
  void metaspace(const PreTokenizerStep& step, const Scratch::Piece& piece,
                 std::vector<Scratch::Piece>& out) {
    const std::string_view mark = step.replacement;
    std::string& text = scratch_.rewritten.emplace_back();
    const bool prepend =
        (step.prepend == PrependScheme::kAlways && piece.start != Scratch::Start::kContinuation) ||
        (step.prepend == PrependScheme::kFirst && piece.start == Scratch::Start::kText);
    if (prepend && !piece.text.starts_with(' ') && !piece.text.starts_with(mark)) text = mark;
    for (const char ch : piece.text) {
      if (ch == ' ') {
        text += mark;
      } else {
        text += ch;
      }
    }
    if (!step.split) {
      out.push_back({text, piece.start});
      return;
    }
    // A mark cannot be found inside another: UTF-8 characters never overlap.
    size_t begin = 0;
    for (size_t at = text.find(mark, 1); at != std::string::npos; at = text.find(mark, at + 1)) {
      out.push_back({std::string_view(text).substr(begin, at - begin), starts(piece, begin)});
      begin = at;
    }
    out.push_back({std::string_view(text).substr(begin), starts(piece, begin)});
  }

  // NormalizedString::split: each part is (range, is_match) on entry and (range, remove) after.
  static void apply_behavior(SplitBehavior behavior,
                             std::vector<std::pair<ByteRange, bool>>& parts) {
    if (behavior == SplitBehavior::kIsolated) {
      for (auto& part : parts) part.second = false;
      return;
    }
    if (behavior == SplitBehavior::kRemoved) return;
    const bool backwards = behavior == SplitBehavior::kMergedWithNext;
    if (backwards) std::reverse(parts.begin(), parts.end());
    std::vector<std::pair<ByteRange, bool>> merged;
    bool previous_match = false;
    for (const auto& [range, is_match] : parts) {
      const bool join = behavior == SplitBehavior::kContiguous ? is_match == previous_match
                                                               : is_match && !previous_match;
      if (join && !merged.empty()) {
        ByteRange& last = merged.back().first;
        if (backwards) {
          last.first = range.first;
        } else {
          last.second = range.second;
        }
      } else {
        merged.push_back({range, false});
      }
      previous_match = is_match;
    }
    if (backwards) std::reverse(merged.begin(), merged.end());
    parts.swap(merged);
  }

  static void split_on_white_space(const Scratch::Piece& piece, std::vector<Scratch::Piece>& out) {
    const std::string_view text = piece.text;
    size_t word = 0;
    for (size_t at = 0; at < text.size();) {
      const Utf8Char c = decode_utf8(text, at);
      if (is_white_space(c.code_point)) {
        if (word < at) out.push_back({text.substr(word, at - word), starts(piece, word)});
        word = at + c.length;
      }
      at += c.length;
    }
    if (word < text.size()) out.push_back({text.substr(word), starts(piece, word)});
  }

  // The Isolated split: every match and every gap a piece.
  void split_isolated(const TokenizerRegex& regex, std::string_view text,
                      std::vector<std::string_view>& out) {
    regex.find_all(text, scratch_.matches);
    size_t previous = 0;
    for (const auto& [start, stop] : scratch_.matches) {
      if (previous < start) out.push_back(text.substr(previous, start - previous));
      if (start < stop) out.push_back(text.substr(start, stop - start));
      previous = stop;
    }
    if (previous < text.size()) out.push_back(text.substr(previous));
  }

  // BPE over one pre-tokenized word (BPE::merge_word and Word::merge_all): its bytes in
  // byte-level BPE, its characters otherwise.
  void encode_word(std::string_view word) {
    if (model_.ignore_merges || (model_.byte_level && word.size() == 1)) {
      // A single byte gains nothing from merging; with ignore_merges a whole word in the
      // vocabulary is taken as it is.
      const StringMap& whole = model_.byte_level ? model_.vocab_by_bytes : model_.vocab;
      if (const auto it = whole.find(word); it != whole.end()) {
        ids_.push_back(it->second);
        return;
      }
    }
    if (word.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
      // Symbols are linked by int32 indices; no real text has a 2 GB word.
      throw std::length_error("BPE: a pre-tokenized word of " + std::to_string(word.size()) +
                              " bytes is too long");
    }
    scratch_.symbols.clear();
    pending_unk_ = -1;
    if (model_.byte_level) {
      for (const char ch : word) {
        const auto byte = static_cast<uint8_t>(ch);
        add_unit(model_.byte_ids[byte], model_.fallback_ids[byte], 1);
      }
    } else {
      add_characters(word);
    }
    if (pending_unk_ >= 0) add_symbol(pending_unk_, pending_length_);
    merge_and_emit();
  }

  // Each character's token, else the "<0xXX>" tokens of its bytes. An ill-formed byte is a
  // character of its own, which only the byte fallback can have a token for.
  void add_characters(std::string_view word) {
    std::array<int32_t, 4> fallback{};
    for (size_t at = 0; at < word.size();) {
      const uint32_t length = decode_utf8(word, at).length;
      const auto it = model_.vocab.find(word.substr(at, length));
      size_t fallback_count = 0;
      if (it == model_.vocab.end() && model_.byte_fallback) {
        while (fallback_count < length) {
          const int32_t id = model_.hex_byte_ids[static_cast<uint8_t>(word[at + fallback_count])];
          if (id < 0) {
            fallback_count = 0;
            break;
          }
          fallback[fallback_count++] = id;
        }
      }
      add_unit(it == model_.vocab.end() ? -1 : it->second,
               std::span<const int32_t>(fallback.data(), fallback_count), length);
      at += length;
    }
  }

  // One unit of a word: its token `id` (-1 for none), else its byte-fallback tokens, else the
  // unknown token (consecutive ones fused into one with fuse_unk), else nothing.
  void add_unit(int32_t id, std::span<const int32_t> fallback, uint32_t length) {
    if (id >= 0) {
      if (pending_unk_ >= 0) add_symbol(pending_unk_, pending_length_);
      pending_unk_ = -1;
      add_symbol(id, length);
    } else if (!fallback.empty()) {
      // As in the library, an unknown token still pending stays pending (it comes out after
      // these, and fuse_unk may still grow it).
      for (const int32_t byte_id : fallback) add_symbol(byte_id, 1);
    } else if (model_.unk_id) {
      if (pending_unk_ >= 0 && model_.fuse_unk) {
        pending_length_ += length;
      } else {
        if (pending_unk_ >= 0) add_symbol(pending_unk_, pending_length_);
        pending_unk_ = *model_.unk_id;
        pending_length_ = length;
      }
    }
  }

  void add_symbol(int32_t id, uint32_t length) {
    auto& symbols = scratch_.symbols;
    const auto index = static_cast<int32_t>(symbols.size());
    if (!symbols.empty()) symbols.back().next = index;
    symbols.push_back({id, index - 1, -1, length});
  }

  // Applies the merges, lowest rank first, and emits the symbols left.
  void merge_and_emit() {
    auto& symbols = scratch_.symbols;
    auto& queue = scratch_.queue;
    const auto rule = [this](int32_t left, int32_t right) -> const MergeRule* {
      const auto it = model_.merges.find(pair_key(left, right));
      return it == model_.merges.end() ? nullptr : &it->second;
    };
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      if (const MergeRule* r = rule(symbols[i].id, symbols[i + 1].id)) {
        queue.push({r->rank, static_cast<uint32_t>(i), r->new_id});
      }
    }
    while (!queue.empty()) {
      const Scratch::Merge top = queue.top();
      queue.pop();
      Scratch::Symbol& left = symbols[top.pos];
      if (left.length == 0 || left.next < 0) continue;
      const Scratch::Symbol right = symbols[static_cast<size_t>(left.next)];
      // A queued merge is stale when its pair has changed since; the library tells by the merged
      // id alone, and so must this to agree with it.
      const MergeRule* current = rule(left.id, right.id);
      if (current == nullptr || current->new_id != top.new_id) continue;
      symbols[static_cast<size_t>(left.next)].length = 0;
      left.id = top.new_id;
      left.length += right.length;
      left.next = right.next;
      if (right.next >= 0) {
        symbols[static_cast<size_t>(right.next)].prev = static_cast<int32_t>(top.pos);
      }
      if (left.prev >= 0) {
        if (const MergeRule* r = rule(symbols[static_cast<size_t>(left.prev)].id, left.id)) {
          queue.push({r->rank, static_cast<uint32_t>(left.prev), r->new_id});
        }
      }
      if (left.next >= 0) {
        if (const MergeRule* r = rule(left.id, symbols[static_cast<size_t>(left.next)].id)) {
          queue.push({r->rank, top.pos, r->new_id});
        }
      }
    }
    for (const Scratch::Symbol& symbol : symbols) {
      if (symbol.length != 0) ids_.push_back(symbol.id);
    }
  }

  const BpeTokenizer::Model& model_;
  std::vector<int32_t>& ids_;
  Scratch scratch_;
  Start start_;
  int32_t pending_unk_ = -1;  // an unknown token not yet added, so that fuse_unk can grow it
  uint32_t pending_length_ = 0;
};

}  // namespace

BpeTokenizer::BpeTokenizer(std::unique_ptr<const Model> model) : model_(std::move(model)) {}
BpeTokenizer::~BpeTokenizer() = default;

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_json(std::string_view json_text,
                                                      const std::string& source) {
  return std::unique_ptr<BpeTokenizer>(new BpeTokenizer(Parser(source).parse(json_text)));
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::load(const std::filesystem::path& path) {
  return from_json(read_file(path), path.string());
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  Encoder(*model_, ids, Encoder::Start::kText).encode(text);
  return ids;
}

std::vector<int32_t> BpeTokenizer::encode_continuation(std::string_view text,
                                                       int32_t previous_id) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  // After an added token a new section starts, which is not the start of the whole text.
  const auto start = model_->added_by_id.contains(previous_id) ? Encoder::Start::kSection
                                                               : Encoder::Start::kContinuation;
  Encoder(*model_, ids, start).encode(text);
  return ids;
}

std::string BpeTokenizer::decode(std::span<const int32_t> ids) const {
  if (!model_->byte_level) {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (const int32_t id : ids) {
      const auto it = model_->token_of_id.find(id);
      if (it != model_->token_of_id.end()) tokens.push_back(it->second);
    }
    return decode_tokens(model_->decoder, std::move(tokens));
  }
  std::string bytes;
  for (const int32_t id : ids) {
    const auto it = model_->bytes_of_id.find(id);
    if (it != model_->bytes_of_id.end()) bytes += it->second;
  }
  return utf8_lossy(bytes);
}

int64_t BpeTokenizer::vocab_size() const { return model_->vocab_size; }

bool BpeTokenizer::adds_dummy_prefix() const { return model_->adds_dummy_prefix; }

std::optional<int32_t> BpeTokenizer::token_to_id(std::string_view token) const {
  if (const auto it = model_->added_by_content.find(token); it != model_->added_by_content.end()) {
    return it->second;
  }
  if (const auto it = model_->vocab.find(token); it != model_->vocab.end()) return it->second;
  return std::nullopt;
}

std::optional<std::string> BpeTokenizer::id_to_token(int32_t id) const {
  const auto it = model_->token_of_id.find(id);
  if (it == model_->token_of_id.end()) return std::nullopt;
  return it->second;
}

}  // namespace lomo
