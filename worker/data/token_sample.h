// What one training record becomes: token ids with a per-token trainable mask, and the error a
// record that cannot become one raises.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lomo {

// trainable[i] != 0 means ids[i] is a training target: the model is trained to predict it from
// ids[0..i). trainable[0] is never used (nothing predicts the first token). The rows cut from a
// sample (token_dataset.h) take input_ids[i] = ids[i] and targets[i] = ids[i + 1] when
// trainable[i + 1], else −100.
struct TokenSample {
  std::vector<int32_t> ids;
  std::vector<uint8_t> trainable;  // same size as ids

  // Tokens that are training targets: trainable[i] for i >= 1.
  int64_t target_count() const {
    int64_t count = 0;
    for (size_t i = 1; i < trainable.size(); ++i) count += trainable[i] != 0;
    return count;
  }
  bool operator==(const TokenSample&) const = default;
};

// A record that cannot become a sample. field() is the path inside the record
// ("messages[2].role"), empty when the problem is the line as a whole (not JSON, not an object).
// what() is "field 'messages[2].role': unknown role 'bot' (...)" or the bare message.
class RecordError : public std::invalid_argument {
 public:
  RecordError(std::string field, const std::string& message)
      : std::invalid_argument(field.empty() ? message : "field '" + field + "': " + message),
        field_(std::move(field)) {}
  const std::string& field() const { return field_; }

 private:
  std::string field_;
};

}  // namespace lomo
