#include "kernels/cpu/matmul.h"

#include <oneapi/dnnl/dnnl.h>

#include <stdexcept>
#include <string>

namespace lomo::cpu {

void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  // oneDNN picks its kernel from cpuid at run time (see gemm_dispatch.h for why not OpenBLAS).
  const dnnl_status_t status = dnnl_sgemm(transpose_a ? 'T' : 'N', transpose_b ? 'T' : 'N', m, n, k,
                                          alpha, a, lda, b, ldb, beta, c, ldc);
  if (status != dnnl_success) {
    throw std::runtime_error("sgemm " + std::to_string(m) + "x" + std::to_string(n) + "x" +
                             std::to_string(k) + " (lda " + std::to_string(lda) + ", ldb " +
                             std::to_string(ldb) + ", ldc " + std::to_string(ldc) +
                             ") failed in oneDNN with status " + std::to_string(status));
  }
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
