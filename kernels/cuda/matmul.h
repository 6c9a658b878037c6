// Linear layers and strided-batched products on the GPU through cuBLAS, fp32 storage and fp32
// accumulation (no TF32: results stay within fp32 tolerance of the CPU backend). The same
// contracts as kernels/cpu/matmul.h (row-major) with device pointers.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace lomo::cuda {

// y [m, n] = x [m, k]·Wᵀ (W [n, k]); += when accumulate.
void matmul_forward(cublasHandle_t handle, float* y, const float* x, const float* weight, int64_t m,
                    int64_t n, int64_t k, bool accumulate);
// dx [m, k] = dy [m, n]·W; += when accumulate.
void matmul_backward_input(cublasHandle_t handle, float* dx, const float* dy, const float* weight,
                           int64_t m, int64_t n, int64_t k, bool accumulate);
// dW [n, k] = dyᵀ·x; += when accumulate.
void matmul_backward_weight(cublasHandle_t handle, float* dweight, const float* dy, const float* x,
                            int64_t m, int64_t n, int64_t k, bool accumulate);
// Row-major C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i] (GemmArgs in kernels/kernel_types.h).
void gemm(cublasHandle_t handle, const GemmArgs& args);

}  // namespace lomo::cuda
