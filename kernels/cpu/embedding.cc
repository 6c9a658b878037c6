#include "kernels/cpu/embedding.h"

#include <cstring>

namespace lomo::cpu {

void embedding_forward(float* out, const int32_t* tokens, const void* table, DType dtype,
                       int64_t count, int64_t dim) {
  const size_t row_bytes = static_cast<size_t>(dim) * dtype_size(dtype);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const auto* row = static_cast<const char*>(table) + static_cast<size_t>(tokens[i]) * row_bytes;
    convert_to_float(dtype, row, out + i * dim, static_cast<size_t>(dim));
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
