#include "worker/data/data_format.h"

#include <array>
#include <utility>

namespace lomo {
namespace {

template <typename T, size_t N>
std::optional<T> find_value(const std::array<std::pair<std::string_view, T>, N>& names,
                            std::string_view name) {
  for (const auto& [text, value] : names) {
    if (text == name) return value;
  }
  return std::nullopt;
}

template <typename T, size_t N>
std::string_view find_name(const std::array<std::pair<std::string_view, T>, N>& names, T value) {
  for (const auto& [text, v] : names) {
    if (v == value) return text;
  }
  return "?";
}

constexpr std::array<std::pair<std::string_view, DataFormat>, 7> kFormats = {{
    {"text", DataFormat::kText},
    {"jsonl_text", DataFormat::kJsonlText},
    {"alpaca", DataFormat::kAlpaca},
    {"prompt_completion", DataFormat::kPromptCompletion},
    {"chat", DataFormat::kChat},
    {"tokens", DataFormat::kTokens},
    {"multiple_choice", DataFormat::kMultipleChoice},
}};

constexpr std::array<std::pair<std::string_view, ChatTemplate>, 3> kTemplates = {{
    {"llama-2", ChatTemplate::kLlama2},
    {"llama-3", ChatTemplate::kLlama3},
    {"chatml", ChatTemplate::kChatml},
}};

}  // namespace

std::optional<DataFormat> data_format_from_name(std::string_view name) {
  return find_value(kFormats, name);
}

std::optional<ChatTemplate> chat_template_from_name(std::string_view name) {
  return find_value(kTemplates, name);
}

std::optional<TokenDtype> token_dtype_from_name(std::string_view name) {
  if (name == "uint16") return TokenDtype::kUint16;
  if (name == "uint32") return TokenDtype::kUint32;
  return std::nullopt;
}

std::optional<BadRecordPolicy> bad_record_policy_from_name(std::string_view name) {
  if (name == "fail") return BadRecordPolicy::kFail;
  if (name == "skip") return BadRecordPolicy::kSkip;
  return std::nullopt;
}

std::string_view data_format_name(DataFormat format) { return find_name(kFormats, format); }

std::string_view chat_template_name(ChatTemplate chat_template) {
  return find_name(kTemplates, chat_template);
}

}  // namespace lomo
