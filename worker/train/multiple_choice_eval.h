// Multiple-choice evaluation by log-likelihood, the method of the LOMO paper's SuperGLUE
// evaluation: each candidate answer is appended to the context, the model scores the candidate's
// tokens (and the EOS after it, when the tokenizer has one: chat_template.h), and the candidate
// with the highest total log-likelihood is the prediction (ties: the lowest index). Accuracy is
// the fraction of records whose prediction is the labelled candidate.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "worker/data/jsonl_record.h"
#include "worker/engine/llama_model.h"

namespace lomo {

struct MultipleChoiceResult {
  // log_likelihoods[r][c]: Σ log p(token) over the scored tokens of candidate c of record r
  // (natural log, computed from fp32 logits in double).
  std::vector<std::vector<double>> log_likelihoods;
  std::vector<int64_t> predictions;  // per record
  int64_t correct = 0;
  double accuracy = 0.0;  // correct / records (0 without records)
  double loss = 0.0;      // mean negative log-likelihood per scored token of the correct candidates
  int64_t scored_tokens = 0;  // scored tokens of the correct candidates
};

// Scores every candidate of `records`, `batch_rows` candidates per forward pass (padded to the
// longest; padding cannot affect the scores, attention being causal). Candidates must fit the
// model (load_multiple_choice keeps them within data.max_length + 1 tokens). Runs forward only;
// the model's saved activations are overwritten. `pad_id` must be in the vocabulary.
MultipleChoiceResult score_multiple_choice(LlamaModel& model,
                                           std::span<const MultipleChoiceRecord> records,
                                           int64_t batch_rows, int32_t pad_id);

}  // namespace lomo
