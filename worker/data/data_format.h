// The names a job spec uses for data formats, chat templates, token file widths and the policy for
// bad records, and the enums the data pipeline uses for them.
#pragma once

#include <optional>
#include <string_view>

namespace lomo {

enum class DataFormat {
  kText,              // plain text files: one token stream cut into fixed rows
  kJsonlText,         // JSONL {"text": ...}: one causal-LM sample per record
  kAlpaca,            // JSONL {"instruction", "input"?, "output"}
  kPromptCompletion,  // JSONL {"prompt", "completion"}
  kChat,              // JSONL {"messages": [{"role", "content"}, ...]} with a chat template
  kTokens,            // binary little-endian token ids (llama2.c / nanoGPT .bin files)
  kMultipleChoice,    // JSONL {"context", "choices", "label"}: evaluation only
};

enum class ChatTemplate { kLlama2, kLlama3, kChatml };
enum class TokenDtype { kUint16, kUint32 };
enum class BadRecordPolicy { kFail, kSkip };

// Spec names ("jsonl_text", "llama-3", "uint16", "skip"); nullopt for an unknown name.
std::optional<DataFormat> data_format_from_name(std::string_view name);
std::optional<ChatTemplate> chat_template_from_name(std::string_view name);
std::optional<TokenDtype> token_dtype_from_name(std::string_view name);
std::optional<BadRecordPolicy> bad_record_policy_from_name(std::string_view name);

std::string_view data_format_name(DataFormat format);
std::string_view chat_template_name(ChatTemplate chat_template);

// Formats whose files hold one JSON object per line.
inline bool is_jsonl_format(DataFormat format) {
  return format != DataFormat::kText && format != DataFormat::kTokens;
}

}  // namespace lomo
