// One line of a JSONL data file to a token sample (or, for multiple-choice evaluation, to its
// scored candidates), per data format. The record schemas:
//   jsonl_text         {"text": string}
//   alpaca             {"instruction": string, "input": string (optional, may be null or ""),
//                       "output": string}
//   prompt_completion  {"prompt": string, "completion": string}
//   chat               {"messages": [{"role": "system" | "user" | "assistant",
//                                     "content": string}, ...]}  (non-empty)
//   multiple_choice    {"context": string, "choices": [string, ...] (at least 2),
//                       "label": integer, the index of the correct choice}
// Other keys (an "id", a "source") are ignored. How each record becomes tokens and which of them
// are trainable: chat_template.h.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "worker/data/chat_template.h"
#include "worker/data/data_format.h"
#include "worker/data/token_sample.h"
#include "worker/data/tokenizer.h"

namespace lomo {

struct RecordOptions {
  DataFormat format = DataFormat::kJsonlText;  // a JSONL format (is_jsonl_format)
  // For kChat: a built-in template, or none for the model's own (tokenizer_config.json's
  // chat_template, rendered by jinja.h; "auto" in a job spec).
  std::optional<ChatTemplate> chat_template;
  bool train_on_prompt = false;  // alpaca, prompt_completion, chat: every token trainable
};

// A multiple-choice question: each candidate is context + candidate, its trainable tokens the
// ones scored (the candidate's and EOS).
struct MultipleChoiceRecord {
  std::vector<TokenSample> candidates;
  int64_t label = 0;  // index into candidates of the correct one
};

class RecordParser {
 public:
  // `tokenizer` must outlive the parser. Throws std::invalid_argument for options that cannot
  // parse anything: a format that is not JSONL, chat without a template, a template whose special
  // tokens the tokenizer lacks.
  RecordParser(const Tokenizer& tokenizer, const RecordOptions& options);

  // The sample of one line (no newline) of a training format (not multiple_choice). Throws
  // RecordError for malformed JSON, a missing field or a wrong type, an unknown role, a role
  // order the template does not allow, or a sample with no trainable tokens; nothing else
  // (std::bad_alloc aside).
  TokenSample sample(std::string_view line) const;

  // A multiple_choice line. Throws RecordError as sample() does, also for fewer than two choices,
  // a label outside them, or a candidate with no token to score.
  MultipleChoiceRecord multiple_choice(std::string_view line) const;

  const RecordOptions& options() const { return options_; }

 private:
  const Tokenizer& tokenizer_;
  RecordOptions options_;
  std::optional<ChatFormatter> chat_;
  std::optional<JinjaChatFormatter> jinja_chat_;
};

}  // namespace lomo
