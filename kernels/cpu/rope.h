// Rotary position embeddings on the CPU (tables: kernels/rope_table.h).
#pragma once

#include <cstdint>

#include "kernels/rope_table.h"

namespace lomo::cpu {

// Rotates x [rows, num_heads, head_dim] in place; positions [rows] index the table.
void rope_forward(float* x, const int32_t* positions, const RopeTableView& table, int64_t rows,
                  int64_t num_heads);
// The transpose rotation: turns the gradient of the rotated tensor into that of its input.
void rope_backward(float* dx, const int32_t* positions, const RopeTableView& table, int64_t rows,
                   int64_t num_heads);

}  // namespace lomo::cpu
