// Token embedding lookup: out[i] = table[tokens[i]].
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace lomo::cpu {

// tokens must be in [0, vocab); the caller validates them (see llama_model.cc). The table is
// stored as `dtype`; each row read is widened to fp32 (no fp32 copy of the table is needed).
void embedding_forward(float* out, const int32_t* tokens, const void* table, DType dtype,
                       int64_t count, int64_t dim);
// Adds each output row's gradient into its token's row of dtable [vocab, dim].
void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t count,
                        int64_t dim);

}  // namespace lomo::cpu
