#include "kernels/cpu/embedding.h"

#include <cstring>

namespace lomo::cpu {

void embedding_forward(float* out, const int32_t* tokens, const float* table, int64_t count,
                       int64_t dim) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(out + i * dim, table + static_cast<int64_t>(tokens[i]) * dim, dim * sizeof(float));
  }
}

void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t count,
                        int64_t dim) {
  // Parallel over columns: repeated tokens add into the same row, so rows cannot be split.
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < dim; ++c) {
    for (int64_t i = 0; i < count; ++i) {
      dtable[static_cast<int64_t>(tokens[i]) * dim + c] += dout[i * dim + c];
    }
  }
}

}  // namespace lomo::cpu
