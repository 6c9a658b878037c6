#include "worker/data/chat_template.h"

#include <nlohmann/json.hpp>
#include <stdexcept>
#include <utility>

#include "worker/data/unicode_text.h"

namespace lomo {
namespace {

// The special tokens of each template, in the order ChatFormatter::special_ holds their ids.
enum Llama3Token { kBeginOfText, kStartHeader, kEndHeader, kEndOfTurn };
enum ChatmlToken { kImStart, kImEnd };
enum Llama2Token { kSentenceStart, kSentenceEnd };

std::vector<std::string_view> template_tokens(ChatTemplate chat_template) {
  switch (chat_template) {
    case ChatTemplate::kLlama3:
      return {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"};
    case ChatTemplate::kChatml:
      return {"<|im_start|>", "<|im_end|>"};
    case ChatTemplate::kLlama2:
      return {"<s>", "</s>"};
  }
  return {};
}

std::string_view role_name(ChatRole role) {
  switch (role) {
    case ChatRole::kSystem:
      return "system";
    case ChatRole::kUser:
      return "user";
    case ChatRole::kAssistant:
      return "assistant";
  }
  return "";
}

std::string message_field(size_t index, const char* member) {
  return "messages[" + std::to_string(index) + "]." + member;
}

}  // namespace

SampleBuilder::SampleBuilder(const Tokenizer& tokenizer, bool train_on_prompt)
    : tokenizer_(tokenizer), train_on_prompt_(train_on_prompt) {}

void SampleBuilder::token(int32_t id, bool response) {
  sample_.ids.push_back(id);
  sample_.trainable.push_back(response || train_on_prompt_ ? 1 : 0);
}

void SampleBuilder::text(std::string_view text, bool response) {
  if (!text.empty()) append(tokenizer_.encode(text), response);
}

void SampleBuilder::continuation(std::string_view text, bool response) {
  if (text.empty()) return;
  append(sample_.ids.empty() ? tokenizer_.encode(text)
                             : tokenizer_.encode_continuation(text, sample_.ids.back()),
         response);
}

void SampleBuilder::append(const std::vector<int32_t>& ids, bool response) {
  sample_.ids.insert(sample_.ids.end(), ids.begin(), ids.end());
  sample_.trainable.insert(sample_.trainable.end(), ids.size(),
                           response || train_on_prompt_ ? 1 : 0);
}

void SampleBuilder::bos() {
  if (const auto id = tokenizer_.bos_id()) token(*id, /*response=*/false);
}

void SampleBuilder::eos() {
  if (const auto id = tokenizer_.eos_id()) token(*id, /*response=*/true);
}

ChatFormatter::ChatFormatter(ChatTemplate chat_template, const Tokenizer& tokenizer)
    : template_(chat_template), tokenizer_(tokenizer) {
  for (const std::string_view name : template_tokens(chat_template)) {
    const std::optional<int32_t> id = tokenizer.token_to_id(name);
    if (!id) {
      throw std::invalid_argument(
          "chat template " + std::string(chat_template_name(chat_template)) + " needs the token " +
          std::string(name) + ", which the tokenizer does not have");
    }
    special_.push_back(*id);
  }
  dummy_prefix_ = tokenizer.adds_dummy_prefix();
}

TokenSample ChatFormatter::format(std::span<const ChatMessage> messages,
                                  bool train_on_prompt) const {
  if (messages.empty()) throw RecordError("messages", "the conversation has no messages");
  SampleBuilder out(tokenizer_, train_on_prompt);
  switch (template_) {
    case ChatTemplate::kLlama3:
      out.token(special_[kBeginOfText], false);
      for (const ChatMessage& m : messages) {
        const bool answer = m.role == ChatRole::kAssistant;
        out.token(special_[kStartHeader], false);
        out.text(role_name(m.role), false);
        out.token(special_[kEndHeader], false);
        out.text("\n\n", false);
        out.text(strip_white_space(m.content), answer);
        out.token(special_[kEndOfTurn], answer);
      }
      break;
    case ChatTemplate::kChatml:
      for (const ChatMessage& m : messages) {
        const bool answer = m.role == ChatRole::kAssistant;
        out.token(special_[kImStart], false);
        out.text(std::string(role_name(m.role)) + "\n", false);
        out.text(m.content, answer);
        out.token(special_[kImEnd], answer);
        out.text("\n", false);
      }
      break;
    case ChatTemplate::kLlama2: {
      size_t first = 0;
      std::string_view system;
      if (messages[0].role == ChatRole::kSystem) {
        system = strip_white_space(messages[0].content);
        first = 1;
      }
      for (size_t i = first; i < messages.size(); ++i) {
        const ChatRole expected = (i - first) % 2 == 0 ? ChatRole::kUser : ChatRole::kAssistant;
        if (messages[i].role != expected) {
          throw RecordError(message_field(i, "role"),
                            "expected " + std::string(role_name(expected)) + ", got " +
                                std::string(role_name(messages[i].role)) +
                                " (the llama-2 template takes an optional first system message, "
                                "then user and assistant turns alternating)");
        }
        const std::string_view content = strip_white_space(messages[i].content);
        if (expected == ChatRole::kUser) {
          std::string prompt = "[INST] ";
          if (i == first && first == 1) {
            prompt += "<<SYS>>\n";
            prompt += system;
            prompt += "\n<</SYS>>\n\n";
          }
          prompt += content;
          prompt += " [/INST]";
          out.token(special_[kSentenceStart], false);
          out.text(prompt, false);
        } else {
          // SentencePiece's dummy prefix already supplies the space after [/INST].
          std::string answer = dummy_prefix_ ? "" : " ";
          answer += content;
          answer += " ";
          out.text(answer, true);
          out.token(special_[kSentenceEnd], true);
        }
      }
      break;
    }
  }
  return out.take();
}

std::string alpaca_prompt(std::string_view instruction, std::string_view input) {
  std::string prompt;
  if (input.empty()) {
    prompt =
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n";
    prompt += instruction;
  } else {
    prompt =
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n";
    prompt += instruction;
    prompt += "\n\n### Input:\n";
    prompt += input;
  }
  prompt += "\n\n### Response:\n";
  return prompt;
}

JinjaChatFormatter::JinjaChatFormatter(const ModelChatTemplate& chat_template,
                                       const Tokenizer& tokenizer)
    : source_(chat_template), tokenizer_(tokenizer) {
  try {
    template_ = std::make_shared<const jinja::Template>(chat_template.source,
                                                        chat_template.file + " chat_template");
  } catch (const jinja::TemplateError& error) {
    throw std::invalid_argument(error.what());
  }
}

std::string JinjaChatFormatter::render(std::span<const ChatMessage> messages,
                                       bool add_generation_prompt) const {
  nlohmann::ordered_json context;
  nlohmann::ordered_json& list = context["messages"] = nlohmann::ordered_json::array();
  for (const ChatMessage& message : messages) {
    list.push_back({{"role", role_name(message.role)}, {"content", message.content}});
  }
  context["bos_token"] = source_.bos_token;
  context["eos_token"] = source_.eos_token;
  context["add_generation_prompt"] = add_generation_prompt;
  return template_->render(context);
}

TokenSample JinjaChatFormatter::format(std::span<const ChatMessage> messages,
                                       bool train_on_prompt) const {
  std::string full;
  std::vector<std::pair<size_t, size_t>> spans;  // trainable [begin, end) of `full`
  try {
    full = render(messages, false);
    for (size_t i = 0; i < messages.size(); ++i) {
      if (messages[i].role != ChatRole::kAssistant) continue;
      const std::string before = render(messages.first(i), true);
      const std::string after = render(messages.first(i + 1), false);
      if (!after.starts_with(before) || !full.starts_with(after) ||
          (!spans.empty() && before.size() < spans.back().second)) {
        throw RecordError("messages[" + std::to_string(i) + "]",
                          "the chat template of " + source_.file +
                              " does not render the conversation up to this assistant message "
                              "as a prefix of the whole, so its tokens cannot be located");
      }
      spans.emplace_back(before.size(), after.size());
    }
  } catch (const jinja::TemplateError& error) {
    throw RecordError("messages", error.what());
  }
  SampleBuilder out(tokenizer_, train_on_prompt);
  const auto piece = [&out, &full](size_t begin, size_t end, bool trainable) {
    const std::string_view text = std::string_view(full).substr(begin, end - begin);
    if (begin == 0) {
      out.text(text, trainable);
    } else {
      out.continuation(text, trainable);
    }
  };
  size_t at = 0;
  for (const auto& [begin, end] : spans) {
    piece(at, begin, false);
    piece(begin, end, true);
    at = end;
  }
  piece(at, full.size(), false);
  return out.take();
}

std::vector<int32_t> JinjaChatFormatter::generation_prompt(
    std::span<const ChatMessage> messages) const {
  try {
    return tokenizer_.encode(render(messages, /*add_generation_prompt=*/true));
  } catch (const jinja::TemplateError& error) {
    throw std::invalid_argument(error.what());
  }
}

}  // namespace lomo
