// Text generation with a KV cache: prefill the prompt, then choose one token at a time until a
// stop token, a stop string or the token budget ends the run.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "worker/data/data_format.h"
#include "worker/data/tokenizer.h"
#include "worker/engine/kv_cache_model.h"
#include "worker/generate/sampler.h"

namespace lomo {

struct GenerationOptions {
  int64_t max_new_tokens = 128;
  SamplingOptions sampling;
  // Generation ends after one of these tokens (kept as the last generated token, as transformers
  // keeps its eos).
  std::vector<int32_t> stop_token_ids;
  // Generation ends once the decoded new text contains one of these; the text is cut before it
  // (the tokens keep the one that completed it). Needs a tokenizer.
  std::vector<std::string> stop_strings;
};

enum class StopReason { kStopToken, kStopString, kLength };
std::string_view stop_reason_name(StopReason reason);  // "stop_token", "stop_string", "length"

struct GenerationResult {
  std::vector<int32_t> tokens;  // the new tokens only
  std::string text;             // their decoded text ("" without a tokenizer), cut at a stop string
  StopReason stop_reason = StopReason::kLength;
};

// Runs `prompt` (non-empty) through `model` from its current length and generates. `tokenizer`
// may be null when there are no stop strings. `on_token` (optional) sees each new token as it is
// chosen. Throws std::invalid_argument for an empty prompt, max_new_tokens < 1, stop strings
// without a tokenizer, or a prompt plus max_new_tokens beyond the model's cache.
GenerationResult generate(KvCacheModel& model, const std::vector<int32_t>& prompt,
                          const GenerationOptions& options, const Tokenizer* tokenizer,
                          const std::function<void(int32_t)>& on_token = {});

// The ids that end generation for the model in `model_dir`, as transformers' generate() takes
// them: generation_config.json's eos_token_id (an integer or a list) when the file has the key,
// else config.json's. Empty when neither names one. Throws std::invalid_argument naming the file
// for malformed JSON or a non-integer id.
std::vector<int32_t> model_stop_token_ids(const std::filesystem::path& model_dir);

// The chat template for `tokenizer` when none is named: llama-3 if it has <|eot_id|>, chatml if
// it has <|im_start|>, llama-2 otherwise.
ChatTemplate detect_chat_template(const Tokenizer& tokenizer);

// A chat prompt: an optional system message and the user's message, formatted with
// `chat_template`, then the opening of the assistant's turn (transformers' add_generation_prompt).
// Adds the token that ends the assistant's turn to *stop_token_ids (when it is not there yet).
std::vector<int32_t> chat_prompt(ChatTemplate chat_template, const Tokenizer& tokenizer,
                                 const std::string& system, const std::string& user,
                                 std::vector<int32_t>* stop_token_ids);

// A chat prompt with the model's own template (tokenizer_config.json's chat_template): an
// optional system message and the user's message rendered with add_generation_prompt and encoded
// as transformers' apply_chat_template does. Adds the template's eos_token (which closes an
// assistant turn in the templates of Llama 3 Instruct, Qwen2.5, ChatML and Mistral) to
// *stop_token_ids when the tokenizer has it. Throws std::invalid_argument naming the file for a
// template that cannot be parsed or rendered.
std::vector<int32_t> model_chat_prompt(const ModelChatTemplate& chat_template,
                                       const Tokenizer& tokenizer, const std::string& system,
                                       const std::string& user,
                                       std::vector<int32_t>* stop_token_ids);

}  // namespace lomo
