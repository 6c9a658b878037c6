// The bias of a linear layer, y = x·Wᵀ + b, kept apart from the product: the product runs through
// BLAS (or cuBLAS) unchanged and the bias is one pass over its output.
#pragma once

#include <cstdint>

namespace lomo::cpu {

// y[r, c] += bias[c] for y [rows, cols].
void bias_forward(float* y, const float* bias, int64_t rows, int64_t cols);
// dbias[c] = Σ_r dy[r, c] for dy [rows, cols]; overwrites dbias [cols]. Each column is summed in
// row order, whatever the thread count: bit-identical across runs and thread counts.
void bias_backward(float* dbias, const float* dy, int64_t rows, int64_t cols);

}  // namespace lomo::cpu
