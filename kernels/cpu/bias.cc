#include "kernels/cpu/bias.h"

#include <algorithm>

namespace lomo::cpu {
namespace {

// Columns per task of the backward sum: 64 floats (a cache line per row and four vectors), so that
// a task streams its rows of dy while the threads split the columns between them.
constexpr int64_t kColumnBlock = 64;

}  // namespace

void bias_forward(float* y, const float* bias, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float* row = y + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] += bias[c];
  }
}

void bias_backward(float* dbias, const float* dy, int64_t rows, int64_t cols) {
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t first = block * kColumnBlock, last = std::min(cols, first + kColumnBlock);
    float sums[kColumnBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = dy + r * cols;
#pragma omp simd
      for (int64_t c = first; c < last; ++c) sums[c - first] += row[c];
    }
    std::copy(sums, sums + (last - first), dbias + first);
  }
}

}  // namespace lomo::cpu
