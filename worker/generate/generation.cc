#include "worker/generate/generation.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "worker/data/chat_template.h"
#include "worker/engine/checkpoint_io.h"
#include "worker/engine/model_files.h"

namespace lomo {

std::string_view stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::kStopToken:
      return "stop_token";
    case StopReason::kStopString:
      return "stop_string";
    case StopReason::kLength:
      return "length";
  }
  return "?";
}

namespace {

// Where the first stop string starts in `text`, or npos.
size_t find_stop_string(const std::string& text, const std::vector<std::string>& stops) {
  size_t first = std::string::npos;
  for (const std::string& stop : stops) first = std::min(first, text.find(stop));
  return first;
}

}  // namespace

GenerationResult generate(KvCacheModel& model, const std::vector<int32_t>& prompt,
                          const GenerationOptions& options, const Tokenizer* tokenizer,
                          const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) throw std::invalid_argument("generate: the prompt has no tokens");
  if (options.max_new_tokens < 1) {
    throw std::invalid_argument("generate: max_new_tokens must be >= 1, got " +
                                std::to_string(options.max_new_tokens));
  }
  if (!options.stop_strings.empty() && tokenizer == nullptr) {
    throw std::invalid_argument("generate: stop strings need a tokenizer");
  }
  for (const std::string& stop : options.stop_strings) {
    if (stop.empty()) throw std::invalid_argument("generate: a stop string is empty");
  }
  // The last new token is chosen but never run through the model: it needs no cache row.
  const int64_t needed =
      model.length() + static_cast<int64_t>(prompt.size()) + options.max_new_tokens - 1;
  if (needed > model.capacity()) {
    throw std::invalid_argument(
        "generate: the prompt (" + std::to_string(prompt.size()) + " tokens) and " +
        std::to_string(options.max_new_tokens) + " new tokens need " + std::to_string(needed) +
        " positions, the model's cache holds " + std::to_string(model.capacity()));
  }
  Sampler sampler(options.sampling);
  GenerationResult result;
  std::vector<float> logits = model.append(prompt);
  const size_t vocab = logits.size() / prompt.size();
  std::span<const float> row(logits.data() + logits.size() - vocab, vocab);
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    const int32_t token = sampler.next(row);
    result.tokens.push_back(token);
    if (on_token) on_token(token);
    if (std::find(options.stop_token_ids.begin(), options.stop_token_ids.end(), token) !=
        options.stop_token_ids.end()) {
      result.stop_reason = StopReason::kStopToken;
      break;
    }
    if (!options.stop_strings.empty()) {
      const size_t at = find_stop_string(tokenizer->decode(result.tokens), options.stop_strings);
      if (at != std::string::npos) {
        result.stop_reason = StopReason::kStopString;
        break;
      }
    }
    if (i + 1 == options.max_new_tokens) break;
    const int32_t next[] = {token};
    logits = model.append(next);
    row = std::span<const float>(logits.data(), vocab);
  }
  if (tokenizer != nullptr) {
    result.text = tokenizer->decode(result.tokens);
    const size_t at = find_stop_string(result.text, options.stop_strings);
    if (at != std::string::npos) result.text.resize(at);
  }
  return result;
}

namespace {

// The eos_token_id of one JSON document: nullopt when it has no such key (or null).
std::optional<std::vector<int32_t>> eos_ids_of(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) return std::nullopt;
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json json = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    throw std::invalid_argument(file.string() + ": not a JSON object");
  }
  const auto it = json.find("eos_token_id");
  if (it == json.end() || it->is_null()) return std::nullopt;
  std::vector<int32_t> ids;
  const nlohmann::json list = it->is_array() ? *it : nlohmann::json::array({*it});
  for (const nlohmann::json& id : list) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      throw std::invalid_argument(file.string() + ": eos_token_id: expected an integer or a " +
                                  "list of token ids (integers >= 0), got " + it->dump());
    }
    ids.push_back(id.get<int32_t>());
  }
  return ids;
}

}  // namespace

std::vector<int32_t> model_stop_token_ids(const std::filesystem::path& model_dir) {
  if (auto ids = eos_ids_of(model_dir / kGenerationConfigFileName)) return *ids;
  if (auto ids = eos_ids_of(model_dir / kConfigFileName)) return *ids;
  return {};
}

ChatTemplate detect_chat_template(const Tokenizer& tokenizer) {
  if (tokenizer.token_to_id("<|eot_id|>")) return ChatTemplate::kLlama3;
  if (tokenizer.token_to_id("<|im_start|>")) return ChatTemplate::kChatml;
  return ChatTemplate::kLlama2;
}

namespace {

int32_t required_token(const Tokenizer& tokenizer, std::string_view name, ChatTemplate t) {
  const std::optional<int32_t> id = tokenizer.token_to_id(name);
  if (!id) {
    throw std::invalid_argument("chat template " + std::string(chat_template_name(t)) +
                                " needs the token " + std::string(name) +
                                ", which the tokenizer does not have");
  }
  return *id;
}

void append_text(std::vector<int32_t>& ids, const Tokenizer& tokenizer, std::string_view text) {
  const std::vector<int32_t> encoded = tokenizer.encode(text);
  ids.insert(ids.end(), encoded.begin(), encoded.end());
}

}  // namespace

namespace {

std::vector<ChatMessage> chat_messages(const std::string& system, const std::string& user) {
  std::vector<ChatMessage> messages;
  if (!system.empty()) messages.push_back({ChatRole::kSystem, system});
  messages.push_back({ChatRole::kUser, user});
  return messages;
}

void add_stop_id(int32_t id, std::vector<int32_t>* stop_token_ids) {
  if (std::find(stop_token_ids->begin(), stop_token_ids->end(), id) == stop_token_ids->end()) {
    stop_token_ids->push_back(id);
  }
}

}  // namespace

std::vector<int32_t> model_chat_prompt(const ModelChatTemplate& chat_template,
                                       const Tokenizer& tokenizer, const std::string& system,
                                       const std::string& user,
                                       std::vector<int32_t>* stop_token_ids) {
  const JinjaChatFormatter formatter(chat_template, tokenizer);
  std::vector<int32_t> ids = formatter.generation_prompt(chat_messages(system, user));
  if (!chat_template.eos_token.empty()) {
    if (const std::optional<int32_t> eos = tokenizer.token_to_id(chat_template.eos_token)) {
      add_stop_id(*eos, stop_token_ids);
    }
  }
  return ids;
}

std::vector<int32_t> chat_prompt(ChatTemplate chat_template, const Tokenizer& tokenizer,
                                 const std::string& system, const std::string& user,
                                 std::vector<int32_t>* stop_token_ids) {
  const ChatFormatter formatter(chat_template, tokenizer);
  std::vector<int32_t> ids = formatter.format(chat_messages(system, user), false).ids;
  std::optional<int32_t> end_of_turn;
  switch (chat_template) {
    case ChatTemplate::kLlama3:
      ids.push_back(required_token(tokenizer, "<|start_header_id|>", chat_template));
      append_text(ids, tokenizer, "assistant");
      ids.push_back(required_token(tokenizer, "<|end_header_id|>", chat_template));
      append_text(ids, tokenizer, "\n\n");
      end_of_turn = required_token(tokenizer, "<|eot_id|>", chat_template);
      break;
    case ChatTemplate::kChatml:
      ids.push_back(required_token(tokenizer, "<|im_start|>", chat_template));
      append_text(ids, tokenizer, "assistant\n");
      end_of_turn = required_token(tokenizer, "<|im_end|>", chat_template);
      break;
    case ChatTemplate::kLlama2:  // the user turn ends with " [/INST]": the answer follows
      end_of_turn = tokenizer.eos_id();
      break;
  }
  if (end_of_turn) add_stop_id(*end_of_turn, stop_token_ids);
  return ids;
}

}  // namespace lomo
