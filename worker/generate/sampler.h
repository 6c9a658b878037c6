// Choosing the next token from a row of logits: greedy, or sampling with temperature, top-k and
// top-p (nucleus) filtering as transformers' generate() applies them (temperature, then top-k,
// then top-p), from a seeded generator so that a seed always gives the same tokens.
#pragma once

#include <cstdint>
#include <random>
#include <span>

namespace lomo {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy (argmax; the lowest id among equal maxima)
  int64_t top_k = 0;         // keep the k most likely tokens (and ties with the k-th); 0: all
  double top_p = 1.0;        // keep the smallest set whose probability reaches top_p; 1: all
  uint64_t seed = 0;

  // Throws std::invalid_argument naming the option (temperature < 0 or not finite, top_k < 0,
  // top_p outside (0, 1]).
  void validate() const;
};

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options);  // validates
  // The next token id; `logits` is one row over the vocabulary. Throws std::invalid_argument for
  // an empty row or one whose values are NaN.
  int32_t next(std::span<const float> logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 generator_;  // the same sequence on every platform for a seed
};

}  // namespace lomo
