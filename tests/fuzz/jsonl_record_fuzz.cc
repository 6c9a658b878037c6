// Fuzzes the JSONL record parser with every data format and chat template, the way the loader
// hands it one line of an untrusted data file. It may reject a line only with RecordError; a
// sample it accepts must have one trainable flag per token, ids inside the vocabulary and at
// least one training target, and a multiple-choice record at least two candidates, a label among
// them and something to score in each. Anything else (a crash, a sanitizer report, another
// exception) is a finding. It returns 0 if at least one format accepted the line, -1 if all
// rejected it.
//
// The tokenizer is the Llama 3 style test tokenizer with the ChatML and Llama 2 template tokens
// added, so that all three templates run on one vocabulary.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "common/read_file.h"
#include "worker/data/bpe_tokenizer.h"
#include "worker/data/jsonl_record.h"

namespace {

std::unique_ptr<lomo::Tokenizer> make_tokenizer() {
  nlohmann::json json = nlohmann::json::parse(
      lomo::read_file(std::string(LOMO_TEST_DATA_DIR) + "/tokenizers/llama3_style/tokenizer.json"));
  int id = 1008;
  for (const char* token : {"<|im_start|>", "<|im_end|>", "<s>", "</s>"}) {
    json["added_tokens"].push_back({{"id", id++}, {"content", token}, {"special", true}});
  }
  std::unique_ptr<lomo::Tokenizer> tokenizer =
      lomo::BpeTokenizer::from_json(json.dump(), "fuzz-tokenizer.json");
  tokenizer->set_special_token_ids({1002, 1006, std::nullopt});  // <|begin_of_text|>, <|eot_id|>
  return tokenizer;
}

const lomo::Tokenizer& tokenizer() {
  static const std::unique_ptr<lomo::Tokenizer> instance = make_tokenizer();
  return *instance;
}

void check_sample(const lomo::TokenSample& sample, bool scored_only_at_end) {
  if (sample.ids.size() != sample.trainable.size()) __builtin_trap();
  for (const int32_t id : sample.ids) {
    if (id < 0 || id >= tokenizer().vocab_size()) __builtin_trap();
  }
  if (sample.target_count() == 0) __builtin_trap();
  if (scored_only_at_end) {
    // A multiple-choice candidate: context (not scored), then the candidate (scored).
    bool scored = false;
    for (const uint8_t flag : sample.trainable) {
      if (scored && !flag) __builtin_trap();
      scored |= flag != 0;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view line(reinterpret_cast<const char*>(data), size);
  const bool train_on_prompt = size % 2 == 1;
  using lomo::ChatTemplate;
  using lomo::DataFormat;
  const std::vector<lomo::RecordOptions> options = {
      {DataFormat::kJsonlText, std::nullopt, false},
      {DataFormat::kAlpaca, std::nullopt, train_on_prompt},
      {DataFormat::kPromptCompletion, std::nullopt, train_on_prompt},
      {DataFormat::kChat, ChatTemplate::kLlama2, train_on_prompt},
      {DataFormat::kChat, ChatTemplate::kLlama3, train_on_prompt},
      {DataFormat::kChat, ChatTemplate::kChatml, train_on_prompt},
  };
  bool accepted = false;  // by at least one format
  for (const lomo::RecordOptions& o : options) {
    const lomo::RecordParser parser(tokenizer(), o);
    try {
      check_sample(parser.sample(line), false);
      accepted = true;
    } catch (const lomo::RecordError&) {
      // the documented rejection
    }
  }
  const lomo::RecordParser choices(tokenizer(), {DataFormat::kMultipleChoice, std::nullopt, false});
  try {
    const lomo::MultipleChoiceRecord record = choices.multiple_choice(line);
    if (record.candidates.size() < 2 || record.label < 0 ||
        record.label >= static_cast<int64_t>(record.candidates.size())) {
      __builtin_trap();
    }
    for (const lomo::TokenSample& candidate : record.candidates) check_sample(candidate, true);
    accepted = true;
  } catch (const lomo::RecordError&) {
  }
  return accepted ? 0 : -1;  // -1: every format rejected the line
}
