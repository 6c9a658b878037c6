#include "kernels/cpu/matmul.h"

#include <cblas.h>

namespace lomo::cpu {

void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
              transpose_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda),
              b, static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

void matmul_forward(float* y, const float* x, const float* weight, int64_t m, int64_t n, int64_t k,
                    bool accumulate) {
  gemm(false, true, m, n, k, 1.0f, x, k, weight, k, accumulate ? 1.0f : 0.0f, y, n);
}

void matmul_backward_input(float* dx, const float* dy, const float* weight, int64_t m, int64_t n,
                           int64_t k, bool accumulate) {
  gemm(false, false, m, k, n, 1.0f, dy, n, weight, k, accumulate ? 1.0f : 0.0f, dx, k);
}

void matmul_backward_weight(float* dweight, const float* dy, const float* x, int64_t m, int64_t n,
                            int64_t k, bool accumulate) {
  gemm(true, false, n, k, m, 1.0f, dy, n, x, k, accumulate ? 1.0f : 0.0f, dweight, k);
}

}  // namespace lomo::cpu
