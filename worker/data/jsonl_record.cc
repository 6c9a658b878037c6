#include "worker/data/jsonl_record.h"

#include <cstdio>
#include <exception>
#include <new>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "common/printable.h"

namespace lomo {
namespace {

using nlohmann::json;

// A value quoted back in a message, cut and escaped (common/printable.h): records come from
// arbitrary files.
std::string quoted(std::string_view text) { return "'" + printable_excerpt(text, 40) + "'"; }

std::string type_of(const json& value) {
  switch (value.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::object:
      return "an object";
    case json::value_t::array:
      return "an array";
    case json::value_t::string:
      return "a string";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::number_float:
      return "a number";
    default:
      return "an integer";
  }
}

// The parsed line; RecordError for anything but a JSON object.
json parse_object(std::string_view line) {
  json record;
  try {
    record = json::parse(line.begin(), line.end());
  } catch (const json::exception& e) {
    // "[json.exception.parse_error.101] parse error at line 1, column 7: syntax error ..." →
    // "column 7: syntax error ...": the line is ours to name. (A number too large for a double
    // is an out_of_range error, also reported here.)
    std::string message = e.what();
    if (const size_t at = message.find("column "); at != std::string::npos) {
      message = message.substr(at);
    } else if (const size_t bracket = message.find("] "); bracket != std::string::npos) {
      message = message.substr(bracket + 2);
    }
    throw RecordError("", "not valid JSON: " + message);
  }
  if (!record.is_object()) {
    throw RecordError("", "expected a JSON object, got " + type_of(record));
  }
  return record;
}

const json* member(const json& object, const char* key) {
  const auto it = object.find(key);
  return it == object.end() ? nullptr : &*it;
}

// A string member; `optional` members may be absent or null (then "").
std::string_view string_member(const json& object, const char* key, const std::string& field,
                               bool optional = false) {
  const json* value = member(object, key);
  if (value == nullptr || (optional && value->is_null())) {
    if (optional) return {};
    throw RecordError(field, "required");
  }
  if (!value->is_string()) throw RecordError(field, "expected a string, got " + type_of(*value));
  return value->get_ref<const std::string&>();
}

const json& array_member(const json& object, const char* key) {
  const json* value = member(object, key);
  if (value == nullptr) throw RecordError(key, "required");
  if (!value->is_array()) throw RecordError(key, "expected an array, got " + type_of(*value));
  return *value;
}

ChatRole parse_role(const json& message, const std::string& field) {
  const std::string_view role = string_member(message, "role", field);
  if (role == "system") return ChatRole::kSystem;
  if (role == "user") return ChatRole::kUser;
  if (role == "assistant") return ChatRole::kAssistant;
  throw RecordError(field, "unknown role " + quoted(role) + " (expected system, user, assistant)");
}

void require_targets(const TokenSample& sample, const char* what) {
  if (sample.target_count() == 0) {
    throw RecordError("", std::string("no trainable tokens (") + what + ")");
  }
}

}  // namespace

RecordParser::RecordParser(const Tokenizer& tokenizer, const RecordOptions& options)
    : tokenizer_(tokenizer), options_(options) {
  if (!is_jsonl_format(options.format)) {
    throw std::invalid_argument("format " + std::string(data_format_name(options.format)) +
                                " is not a JSONL format");
  }
  if (options.format == DataFormat::kChat) {
    if (options.chat_template) {
      chat_.emplace(*options.chat_template, tokenizer);
    } else if (tokenizer.chat_template()) {
      jinja_chat_.emplace(*tokenizer.chat_template(), tokenizer);
    } else {
      throw std::invalid_argument(
          "chat template auto: the model's tokenizer_config.json has no chat_template; name one "
          "of llama-2, llama-3, chatml");
    }
  }
}

TokenSample RecordParser::sample(std::string_view line) const {
  const json record = parse_object(line);
  try {
    SampleBuilder out(tokenizer_, options_.train_on_prompt);
    switch (options_.format) {
      case DataFormat::kJsonlText: {
        const std::string_view text = string_member(record, "text", "text");
        out.bos();
        out.text(text, true);
        out.eos();
        TokenSample sample = out.take();
        require_targets(sample, "the text is empty and the tokenizer has no BOS and EOS");
        return sample;
      }
      case DataFormat::kAlpaca: {
        const std::string_view instruction = string_member(record, "instruction", "instruction");
        const std::string_view input = string_member(record, "input", "input", true);
        const std::string_view output = string_member(record, "output", "output");
        out.bos();
        out.text(alpaca_prompt(instruction, input), false);
        out.text(output, true);
        out.eos();
        TokenSample sample = out.take();
        require_targets(sample, "the output is empty and the tokenizer has no EOS");
        return sample;
      }
      case DataFormat::kPromptCompletion: {
        const std::string_view prompt = string_member(record, "prompt", "prompt");
        const std::string_view completion = string_member(record, "completion", "completion");
        out.bos();
        out.text(prompt, false);
        out.text(completion, true);
        out.eos();
        TokenSample sample = out.take();
        require_targets(sample, "the completion is empty and the tokenizer has no EOS");
        return sample;
      }
      case DataFormat::kChat: {
        const json& messages = array_member(record, "messages");
        std::vector<ChatMessage> chat;
        chat.reserve(messages.size());
        for (size_t i = 0; i < messages.size(); ++i) {
          const std::string field = "messages[" + std::to_string(i) + "]";
          const json& message = messages[i];
          if (!message.is_object()) {
            throw RecordError(field, "expected an object, got " + type_of(message));
          }
          const ChatRole role = parse_role(message, field + ".role");
          chat.push_back({role, string_member(message, "content", field + ".content")});
        }
        TokenSample sample = chat_ ? chat_->format(chat, options_.train_on_prompt)
                                   : jinja_chat_->format(chat, options_.train_on_prompt);
        require_targets(sample, "the conversation has no assistant message");
        return sample;
      }
      case DataFormat::kMultipleChoice:
        throw RecordError("", "multiple_choice records are for evaluation only");
      default:
        break;
    }
  } catch (const RecordError&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    // A tokenizer failure (SentencePiece reports errors as exceptions): the record's fault as
    // far as the pipeline can tell.
    throw RecordError("", std::string("cannot tokenize: ") + e.what());
  }
  throw RecordError("", "not a JSONL format");
}

MultipleChoiceRecord RecordParser::multiple_choice(std::string_view line) const {
  const json record = parse_object(line);
  try {
    const std::string_view context = string_member(record, "context", "context");
    const json& choices = array_member(record, "choices");
    if (choices.size() < 2) {
      throw RecordError("choices",
                        "expected at least 2 candidates, got " + std::to_string(choices.size()));
    }
    const json* label = member(record, "label");
    if (label == nullptr) throw RecordError("label", "required");
    if (!label->is_number_integer()) {
      throw RecordError("label", "expected an integer, got " + type_of(*label));
    }
    const bool in_range = label->is_number_unsigned() && label->get<uint64_t>() < choices.size();
    if (!in_range) {
      throw RecordError("label", "must index choices (0 to " + std::to_string(choices.size() - 1) +
                                     "), got " + label->dump());
    }
    MultipleChoiceRecord result;
    result.label = label->get<int64_t>();
    // The context is encoded once and shared by every candidate.
    SampleBuilder prefix(tokenizer_, false);
    prefix.bos();
    prefix.text(context, false);
    const TokenSample context_tokens = prefix.take();
    for (size_t i = 0; i < choices.size(); ++i) {
      const std::string field = "choices[" + std::to_string(i) + "]";
      if (!choices[i].is_string()) {
        throw RecordError(field, "expected a string, got " + type_of(choices[i]));
      }
      SampleBuilder candidate(tokenizer_, false);
      candidate.text(choices[i].get_ref<const std::string&>(), true);
      candidate.eos();
      TokenSample scored = candidate.take();
      if (scored.ids.empty()) {
        throw RecordError(field, "an empty candidate and no EOS: nothing to score");
      }
      if (context_tokens.ids.empty()) {
        throw RecordError("context",
                          "empty, and the tokenizer has no BOS: the candidate's first token "
                          "would have nothing to be predicted from");
      }
      TokenSample sample = context_tokens;
      sample.ids.insert(sample.ids.end(), scored.ids.begin(), scored.ids.end());
      sample.trainable.insert(sample.trainable.end(), scored.trainable.begin(),
                              scored.trainable.end());
      result.candidates.push_back(std::move(sample));
    }
    return result;
  } catch (const RecordError&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    throw RecordError("", std::string("cannot tokenize: ") + e.what());
  }
}

}  // namespace lomo
