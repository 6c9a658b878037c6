#include "worker/generate/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace lomo {

void SamplingOptions::validate() const {
  if (!std::isfinite(temperature) || temperature < 0.0) {
    throw std::invalid_argument("temperature must be a finite number >= 0 (0 is greedy), got " +
                                std::to_string(temperature));
  }
  if (top_k < 0) {
    throw std::invalid_argument("top_k must be >= 0 (0 keeps every token), got " +
                                std::to_string(top_k));
  }
  if (!(top_p > 0.0 && top_p <= 1.0)) {
    throw std::invalid_argument("top_p must be in (0, 1] (1 keeps every token), got " +
                                std::to_string(top_p));
  }
}

Sampler::Sampler(const SamplingOptions& options) : options_(options), generator_(options.seed) {
  options.validate();
}

namespace {

int32_t argmax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// A uniform double in [0, 1) from 53 bits of the generator: std::uniform_real_distribution's
// algorithm is implementation-defined, this is not.
double uniform(std::mt19937_64& generator) {
  return static_cast<double>(generator() >> 11) * 0x1.0p-53;
}

}  // namespace

int32_t Sampler::next(std::span<const float> logits) {
  if (logits.empty()) throw std::invalid_argument("sampler: empty logits row");
  if (std::any_of(logits.begin(), logits.end(), [](float x) { return std::isnan(x); })) {
    throw std::invalid_argument("sampler: the logits hold NaN");
  }
  if (options_.temperature == 0.0) return argmax(logits);

  // Token ids by descending logit (ties by id, so the order is deterministic).
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = order.size();
  if (options_.top_k > 0 && static_cast<size_t>(options_.top_k) < keep) {
    keep = static_cast<size_t>(options_.top_k);
    const float kth = logits[order[keep - 1]];
    while (keep < order.size() && logits[order[keep]] == kth) ++keep;  // ties with the k-th stay
  }
  std::vector<double> probs(keep);
  const double top = logits[order[0]] / options_.temperature;
  double sum = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp(logits[order[i]] / options_.temperature - top);
    sum += probs[i];
  }
  if (options_.top_p < 1.0) {
    // The most likely tokens until their probability reaches top_p (at least one).
    double cumulative = 0.0;
    size_t nucleus = 0;
    while (nucleus < keep && cumulative < options_.top_p * sum) cumulative += probs[nucleus++];
    keep = std::max<size_t>(nucleus, 1);
    sum = std::accumulate(probs.begin(), probs.begin() + static_cast<ptrdiff_t>(keep), 0.0);
  }
  const double target = uniform(generator_) * sum;
  double cumulative = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    cumulative += probs[i];
    if (target < cumulative) return order[i];
  }
  return order[keep - 1];
}

}  // namespace lomo
