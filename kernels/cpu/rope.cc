#include "kernels/cpu/rope.h"

namespace lomo::cpu {

namespace {

// direction +1 rotates forward, −1 applies the transpose (inverse) rotation.
void rotate(float* x, const int32_t* positions, const RopeTableView& table, int64_t rows,
            int64_t num_heads, float direction) {
  const int64_t half = table.half_dim;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = table.cos + positions[r] * half;
    const float* s = table.sin + positions[r] * half;
    for (int64_t h = 0; h < num_heads; ++h) {
      float* head = x + (r * num_heads + h) * 2 * half;
      for (int64_t i = 0; i < half; ++i) {
        const float first = head[i], second = head[i + half];
        const float sine = direction * s[i];
        head[i] = first * c[i] - second * sine;
        head[i + half] = second * c[i] + first * sine;
      }
    }
  }
}

}  // namespace

void rope_forward(float* x, const int32_t* positions, const RopeTableView& table, int64_t rows,
                  int64_t num_heads) {
  rotate(x, positions, table, rows, num_heads, 1.0f);
}

void rope_backward(float* dx, const int32_t* positions, const RopeTableView& table, int64_t rows,
                   int64_t num_heads) {
  rotate(dx, positions, table, rows, num_heads, -1.0f);
}

}  // namespace lomo::cpu
