// Matrix products of a linear layer y = x·Wᵀ, row-major, fp32, on oneDNN (runtime ISA dispatch).
// Shapes: x [m, k], W [n, k] (PyTorch's nn.Linear layout), y [m, n].
#pragma once

#include <cstdint>

namespace lomo::cpu {

// y = x·Wᵀ, or y += x·Wᵀ when `accumulate`.
void matmul_forward(float* y, const float* x, const float* weight, int64_t m, int64_t n, int64_t k,
                    bool accumulate = false);
// dx = dy·W, or dx += dy·W when `accumulate`.
void matmul_backward_input(float* dx, const float* dy, const float* weight, int64_t m, int64_t n,
                           int64_t k, bool accumulate = false);
// dW = dyᵀ·x, or dW += dyᵀ·x when `accumulate`.
void matmul_backward_weight(float* dweight, const float* dy, const float* x, int64_t m, int64_t n,
                            int64_t k, bool accumulate = false);

// General row-major C = alpha·op(A)·op(B) + beta·C with explicit leading dimensions; oneDNN may use
// its own (OpenMP) threads unless called from inside an OpenMP parallel region.
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);

}  // namespace lomo::cpu
