// Token embedding lookup: out[i] = table[tokens[i]].
#pragma once

#include <cstdint>

namespace lomo::cpu {

// tokens must be in [0, vocab); the caller validates them (see llama_model.cc).
void embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t count,
                       int64_t dim);
// Adds each output row's gradient into its token's row of dtable [vocab, dim].
void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t count,
                        int64_t dim);

}  // namespace lomo::cpu
