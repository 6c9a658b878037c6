#include "worker/train/multiple_choice_eval.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "worker/train/token_dataset.h"

namespace lomo {

MultipleChoiceResult score_multiple_choice(LlamaModel& model,
                                           std::span<const MultipleChoiceRecord> records,
                                           int64_t batch_rows, int32_t pad_id) {
  if (batch_rows < 1) throw std::invalid_argument("batch_rows must be positive");
  MultipleChoiceResult result;
  if (records.empty()) return result;

  // Every candidate as one sample, in record order; rows are cut exactly as for training, so the
  // targets of a row are the candidate's scored tokens and −100 elsewhere.
  SampleStore store;
  int64_t longest = 0;
  for (const MultipleChoiceRecord& record : records) {
    for (const TokenSample& candidate : record.candidates) {
      store.add(candidate);
      longest = std::max(longest, static_cast<int64_t>(candidate.ids.size()) - 1);
    }
  }
  DatasetOptions options;
  options.max_length = longest;
  options.shuffle = false;
  options.pad_id = pad_id;
  const TokenDataset rows(std::move(store), options);
  const std::vector<TokenBatch> batches = rows.first_batches(batch_rows, rows.sample_count());

  std::vector<double> scores;
  scores.reserve(static_cast<size_t>(rows.sample_count()));
  const int64_t vocab = model.weights().config().vocab_size;
  std::vector<float> host_logits;
  for (const TokenBatch& batch : batches) {
    model.evaluate(batch);
    const float* logits = model.logits();
    if (!model.backend().device().is_cpu()) {  // score on the host: copy the logits back once
      const size_t count = static_cast<size_t>(batch.batch_size * batch.seq_len * vocab);
      host_logits.resize(count);
      model.backend().copy_to_host(host_logits.data(), logits, count * sizeof(float));
      logits = host_logits.data();
    }
    for (int64_t r = 0; r < batch.batch_size; ++r) {
      double sum = 0.0;
      for (int64_t t = 0; t < batch.seq_len; ++t) {
        const size_t i = static_cast<size_t>(r * batch.seq_len + t);
        const int32_t target = batch.targets[i];
        if (target < 0) continue;
        const float* row = logits + static_cast<int64_t>(i) * vocab;
        const float max = *std::max_element(row, row + vocab);
        double total = 0.0;
        for (int64_t v = 0; v < vocab; ++v) total += std::exp(static_cast<double>(row[v] - max));
        sum += static_cast<double>(row[target] - max) - std::log(total);
      }
      scores.push_back(sum);
    }
  }

  size_t next = 0;
  double correct_nll = 0.0;
  for (const MultipleChoiceRecord& record : records) {
    std::vector<double> candidate_scores(
        scores.begin() + static_cast<std::ptrdiff_t>(next),
        scores.begin() + static_cast<std::ptrdiff_t>(next + record.candidates.size()));
    next += record.candidates.size();
    const int64_t prediction = std::max_element(candidate_scores.begin(), candidate_scores.end()) -
                               candidate_scores.begin();
    result.correct += prediction == record.label ? 1 : 0;
    correct_nll -= candidate_scores[static_cast<size_t>(record.label)];
    result.scored_tokens += record.candidates[static_cast<size_t>(record.label)].target_count();
    result.predictions.push_back(prediction);
    result.log_likelihoods.push_back(std::move(candidate_scores));
  }
  result.accuracy = static_cast<double>(result.correct) / static_cast<double>(records.size());
  result.loss =
      result.scored_tokens > 0 ? correct_nll / static_cast<double>(result.scored_tokens) : 0;
  return result;
}

}  // namespace lomo
