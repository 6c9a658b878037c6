#include "kernels/cpu/cross_entropy.h"

#include <cmath>
#include <limits>

#include "kernels/cpu/fast_exp.h"

namespace lomo::cpu {

double cross_entropy_forward(float* logsumexp, const float* logits, const int32_t* targets,
                             int64_t rows, int64_t vocab) {
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * vocab;
    float max_logit = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max_logit)
    for (int64_t j = 0; j < vocab; ++j) max_logit = std::fmax(max_logit, row[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < vocab; ++j) sum += fast_exp(row[j] - max_logit);
    logsumexp[r] = max_logit + std::log(sum);
    if (targets[r] != kIgnoreIndex) total += logsumexp[r] - row[targets[r]];
  }
  return total;
}

void cross_entropy_backward(float* dlogits, const float* logits, const float* logsumexp,
                            const int32_t* targets, int64_t rows, int64_t vocab, float scale) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits + r * vocab;
    float* drow = dlogits + r * vocab;
    if (targets[r] == kIgnoreIndex) {
      for (int64_t j = 0; j < vocab; ++j) drow[j] = 0.0f;
      continue;
    }
    // Locals, not the parallel region's shared variables: stores through drow could alias those,
    // which would stop the loop from vectorising.
    const float lse = logsumexp[r], row_scale = scale;
    const int64_t count = vocab;
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) drow[j] = row_scale * fast_exp(row[j] - lse);
    drow[targets[r]] -= scale;
  }
}

}  // namespace lomo::cpu
