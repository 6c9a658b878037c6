#include "worker/data/tokenizer.h"

#include <nlohmann/json.hpp>
#include <stdexcept>

#include "common/read_file.h"
#include "worker/data/bpe_tokenizer.h"
#include "worker/data/sentencepiece_tokenizer.h"

namespace lomo {
namespace {

using nlohmann::json;

// The parsed file, or nullopt when it does not exist.
std::optional<json> read_json_if_present(const std::filesystem::path& path) {
  std::error_code error;
  if (!std::filesystem::exists(path, error)) return std::nullopt;
  const std::string text = read_file(path);
  try {
    json parsed = json::parse(text);
    if (!parsed.is_object()) {
      throw std::invalid_argument(path.string() + ": expected a JSON object, found " +
                                  parsed.type_name());
    }
    return parsed;
  } catch (const json::exception& e) {
    throw std::invalid_argument(path.string() + ": not valid JSON: " + e.what());
  }
}

// config.json's bos_token_id / eos_token_id / pad_token_id: an integer or a list of them (the
// first counts; Llama 3.1 lists several EOS ids). Absent, null (transformers writes null for any
// unset id) or an empty list leave `id` alone; a negative id (some configs write -1) means the
// model has no such token.
void apply_config_id(const json& config, const char* key, const std::filesystem::path& path,
                     const Tokenizer& tokenizer, std::optional<int32_t>& id) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return;
  const std::string where = path.string() + ": " + key;
  const json* value = &*it;
  if (value->is_array()) {
    if (value->empty()) return;
    value = &value->front();
  }
  if (!value->is_number_integer()) {
    throw std::invalid_argument(where + ": expected an integer or a list of integers, found " +
                                it->dump());
  }
  if (!value->is_number_unsigned()) {  // nlohmann keeps non-negative integers unsigned
    id.reset();
    return;
  }
  const uint64_t number = value->get<uint64_t>();
  if (number >= static_cast<uint64_t>(tokenizer.vocab_size())) {
    throw std::invalid_argument(where + ": token id " + std::to_string(number) +
                                " is outside the vocabulary (size " +
                                std::to_string(tokenizer.vocab_size()) + ")");
  }
  id = static_cast<int32_t>(number);
}

// tokenizer_config.json's bos_token / eos_token / pad_token: the token's text, or an object
// whose "content" is (the AddedToken form). Absent leaves `id` alone; null means the tokenizer has
// no such token whatever config.json says (Qwen2 sets bos_token null and trains without BOS,
// while its config.json still names a bos_token_id).
void apply_config_token(const json& config, const char* key, const std::filesystem::path& path,
                        const Tokenizer& tokenizer, std::optional<int32_t>& id) {
  const auto it = config.find(key);
  if (it == config.end()) return;
  if (it->is_null()) {
    id.reset();
    return;
  }
  const std::string where = path.string() + ": " + key;
  const json* content = &*it;
  if (content->is_object()) {
    const auto inner = content->find("content");
    if (inner == content->end()) {
      throw std::invalid_argument(where + ": object without \"content\"");
    }
    content = &*inner;
  }
  if (!content->is_string()) {
    throw std::invalid_argument(where + ": expected a token string or {\"content\": ...}, found " +
                                it->dump());
  }
  const std::string& token = content->get_ref<const std::string&>();
  const std::optional<int32_t> found = tokenizer.token_to_id(token);
  if (!found) {
    throw std::invalid_argument(where + ": \"" + token + "\" is not a token of this tokenizer");
  }
  id = found;
}

// Whether tokenizer.json text describes byte-level BPE: its pre-tokenizer is ByteLevel or a
// Sequence with a ByteLevel step. Invalid JSON counts as byte-level, so that its error is
// reported rather than passed over for tokenizer.model.
bool describes_byte_level_bpe(const std::string& tokenizer_json) {
  const json spec = json::parse(tokenizer_json, nullptr, /*allow_exceptions=*/false);
  if (!spec.is_object()) return true;
  const auto pre = spec.find("pre_tokenizer");
  if (pre == spec.end() || !pre->is_object()) return false;
  const auto is_byte_level = [](const json& step) {
    return step.is_object() && step.value("type", json()).is_string() &&
           step["type"].get<std::string>() == "ByteLevel";
  };
  if (is_byte_level(*pre)) return true;
  const auto steps = pre->find("pretokenizers");
  if (steps == pre->end() || !steps->is_array()) return false;
  for (const json& step : *steps) {
    if (is_byte_level(step)) return true;
  }
  return false;
}

}  // namespace

void Tokenizer::set_special_token_ids(const SpecialTokenIds& ids) {
  for (const auto& [name, id] : {std::pair{"bos", ids.bos}, {"eos", ids.eos}, {"pad", ids.pad}}) {
    if (id && (*id < 0 || *id >= vocab_size())) {
      throw std::invalid_argument(std::string(name) + " token id " + std::to_string(*id) +
                                  " is outside the vocabulary (size " +
                                  std::to_string(vocab_size()) + ")");
    }
  }
  special_ids_ = ids;
}

SpecialTokenIds read_special_token_ids(const std::filesystem::path& model_dir,
                                       const Tokenizer& tokenizer) {
  SpecialTokenIds ids = tokenizer.special_token_ids();
  // Lowest precedence first, so that each source overrides the one before.
  const std::filesystem::path config_path = model_dir / "config.json";
  if (const std::optional<json> config = read_json_if_present(config_path)) {
    apply_config_id(*config, "bos_token_id", config_path, tokenizer, ids.bos);
    apply_config_id(*config, "eos_token_id", config_path, tokenizer, ids.eos);
    apply_config_id(*config, "pad_token_id", config_path, tokenizer, ids.pad);
  }
  const std::filesystem::path tokenizer_config_path = model_dir / "tokenizer_config.json";
  if (const std::optional<json> config = read_json_if_present(tokenizer_config_path)) {
    apply_config_token(*config, "bos_token", tokenizer_config_path, tokenizer, ids.bos);
    apply_config_token(*config, "eos_token", tokenizer_config_path, tokenizer, ids.eos);
    apply_config_token(*config, "pad_token", tokenizer_config_path, tokenizer, ids.pad);
  }
  return ids;
}

namespace {

// The text of tokenizer_config.json's bos_token / eos_token (a string or {"content": ...}).
std::string token_text(const json& config, const char* key) {
  const auto it = config.find(key);
  if (it == config.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    return (*it)["content"].get<std::string>();
  }
  return "";
}

}  // namespace

std::optional<ModelChatTemplate> read_chat_template(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "tokenizer_config.json";
  const std::optional<json> config = read_json_if_present(path);
  if (!config || !config->contains("chat_template") || (*config)["chat_template"].is_null()) {
    return std::nullopt;
  }
  const json& value = (*config)["chat_template"];
  ModelChatTemplate out{"", token_text(*config, "bos_token"), token_text(*config, "eos_token"),
                        path.string()};
  if (value.is_string()) {
    out.source = value.get<std::string>();
    return out;
  }
  // Several named templates ("default", "tool_use", ...): training uses the default one.
  if (value.is_array()) {
    for (const json& entry : value) {
      if (entry.is_object() && entry.value("name", json()) == "default" &&
          entry.value("template", json()).is_string()) {
        out.source = entry["template"].get<std::string>();
        return out;
      }
    }
  }
  throw std::invalid_argument(path.string() +
                              ": chat_template: expected a template string or a list of "
                              "{\"name\", \"template\"} with one named \"default\"");
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& model_dir) {
  std::error_code error;
  if (!std::filesystem::is_directory(model_dir, error)) {
    throw std::runtime_error(model_dir.string() + ": not a directory");
  }
  const std::filesystem::path json_path = model_dir / "tokenizer.json";
  const std::filesystem::path model_path = model_dir / "tokenizer.model";
  const bool has_json = std::filesystem::exists(json_path, error);
  const bool has_model = std::filesystem::exists(model_path, error);
  std::unique_ptr<Tokenizer> tokenizer;
  if (has_json) {
    // tokenizer.json wins, as in transformers (from 5.0 every tokenizer runs on the tokenizers
    // library, which reads tokenizer.json when the directory has one). For Llama 2 and Mistral
    // that is the SentencePiece-style conversion of tokenizer.model: the same ids for ordinary
    // text, but "<s>" and "</s>" in the text (as chat templates render them) are their tokens,
    // not characters. Only such a conversion that lomo cannot read falls back to tokenizer.model,
    // as every non-byte-level tokenizer.json did before lomo read them.
    const std::string text = read_file(json_path);
    try {
      tokenizer = BpeTokenizer::from_json(text, json_path.string());
    } catch (const std::invalid_argument&) {
      if (!has_model || describes_byte_level_bpe(text)) throw;
      tokenizer = SentencePieceTokenizer::load(model_path);
    }
  } else if (has_model) {
    tokenizer = SentencePieceTokenizer::load(model_path);
  } else {
    throw std::runtime_error(model_dir.string() +
                             ": no tokenizer.json (BPE) or tokenizer.model (SentencePiece)");
  }
  tokenizer->set_special_token_ids(read_special_token_ids(model_dir, *tokenizer));
  tokenizer->set_chat_template(read_chat_template(model_dir));
  return tokenizer;
}

}  // namespace lomo
