// The data a job spec names, loaded for the training loop: the tokenizer, the training rows, and
// the evaluation data (rows, or multiple-choice records), whatever the formats.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "jobspec/job_spec.h"
#include "worker/data/jsonl_record.h"
#include "worker/data/sample_loader.h"
#include "worker/data/tokenizer.h"
#include "worker/engine/llama_config.h"
#include "worker/train/token_dataset.h"

namespace lomo {

struct TrainingData {
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<TokenDataset> train;  // always set by load_training_data
  LoadReport train_report;
  // Evaluation: rows for every format but multiple_choice, records for that one; neither
  // without data.eval.
  std::optional<TokenDataset> eval;
  std::vector<MultipleChoiceRecord> eval_choices;
  LoadReport eval_report;
  int32_t pad_id = 0;  // the tokenizer's pad, else EOS, else 0
};

// The tokenizer of a spec: tokenizer.kind bytes (ByteTokenizer) or auto (tokenizer.path, or
// model.path when that is empty). Throws JobSpecError naming tokenizer.* for a missing or broken
// tokenizer, or one whose vocabulary exceeds the model's.
std::unique_ptr<Tokenizer> make_tokenizer(const JobSpec& spec, const LlamaConfig& model);

// Loads data.train and data.eval with the spec's formats, for data-parallel `rank` of
// `world_size`. Throws JobSpecError whose field names the file ("data.train[1]") or the list, and
// whose message names the file and line of a bad record.
TrainingData load_training_data(const JobSpec& spec, const LlamaConfig& model, int64_t rank = 0,
                                int64_t world_size = 1);

}  // namespace lomo
