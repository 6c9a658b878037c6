// Linear layers and strided-batched products on the GPU through cuBLAS, fp32 accumulation. fp32
// operands multiply in fp32 (or TF32 when the handle's math mode allows it); bf16/fp16 operands
// (both of one product in the same dtype) on tensor cores through cublasGemmEx, fp32 output. The
// same contracts as kernels/cpu/matmul.h (row-major) with device pointers.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/kernel_types.h"

namespace lomo::cuda {

// y [m, n] = x [m, k]·Wᵀ (W [n, k]); += when accumulate.
void matmul_forward(cublasHandle_t handle, float* y, TypedInput x, TypedInput weight, int64_t m,
                    int64_t n, int64_t k, bool accumulate);
// dx [m, k] = dy [m, n]·W; += when accumulate.
void matmul_backward_input(cublasHandle_t handle, float* dx, TypedInput dy, TypedInput weight,
                           int64_t m, int64_t n, int64_t k, bool accumulate);
// dW [n, k] = dyᵀ·x; += when accumulate.
void matmul_backward_weight(cublasHandle_t handle, float* dweight, TypedInput dy, TypedInput x,
                            int64_t m, int64_t n, int64_t k, bool accumulate);
// Row-major C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i] (GemmArgs in kernels/kernel_types.h).
void gemm(cublasHandle_t handle, const GemmArgs& args);

}  // namespace lomo::cuda
