// Token cross-entropy of logits against target ids; targets equal to kIgnoreIndex (−100, as in
// PyTorch and Hugging Face) contribute neither loss nor gradient.
#pragma once

#include <cstdint>

#include "kernels/kernel_types.h"

namespace lomo::cpu {

using lomo::kIgnoreIndex;

// logits [rows, vocab]; fills logsumexp [rows] (for the backward pass) and returns the sum of
// −log softmax(logits)[target] over non-ignored rows, in double to keep long sums exact.
double cross_entropy_forward(float* logsumexp, const float* logits, const int32_t* targets,
                             int64_t rows, int64_t vocab);
// dlogits = scale·(softmax(logits) − onehot(target)) for non-ignored rows, 0 for ignored rows.
// dlogits may alias logits (the pass then works in place).
void cross_entropy_backward(float* dlogits, const float* logits, const float* logsumexp,
                            const int32_t* targets, int64_t rows, int64_t vocab, float scale);

}  // namespace lomo::cpu
