// Row-major products through cuBLAS, which is column-major: a row-major [m, n] matrix with leading
// dimension ld is, read column-major, its transpose [n, m] with the same ld. So the row-major
// C = op(A)·op(B) is computed as the column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: the operands swap places
// and keep their own transpose flags. The 64-bit cuBLAS API takes every size and leading dimension
// as int64_t, so shapes beyond 2^31 (vocab·rows, 7B weights) need no narrowing.
#include <stdexcept>
#include <string>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/matmul.h"

namespace lomo::cuda {
namespace {

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw CudaError(std::string(what) + " failed: " + cublasGetStatusName(status) + " (" +
                    cublasGetStatusString(status) + ")");
  }
}

cudaStream_t stream_of(cublasHandle_t handle) {
  cudaStream_t stream = nullptr;
  check_cublas(cublasGetStream(handle, &stream), "cublasGetStream");
  return stream;
}

// C[p] ← beta·C[p] over the m×n window of each batch entry: what a product with k = 0 leaves
// (BLAS semantics, as OpenBLAS does on the CPU: beta = 0 writes zeros without reading C).
__global__ void scale_matrix_kernel(float* c, int64_t m, int64_t n, int64_t ldc, int64_t stride_c,
                                    int64_t batch, float beta) {
  const int64_t total = batch * m * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += stride) {
    const int64_t p = index / (m * n), i = index / n % m, j = index % n;
    float* value = c + p * stride_c + i * ldc + j;
    *value = beta == 0.0f ? 0.0f : beta * *value;
  }
}

void check_shape(const GemmArgs& g) {
  if (g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0) {
    throw std::invalid_argument("cuda gemm: negative size m=" + std::to_string(g.m) +
                                " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) +
                                " batch=" + std::to_string(g.batch));
  }
}

}  // namespace

void gemm(cublasHandle_t handle, const GemmArgs& g) {
  check_shape(g);
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  if (g.k == 0) {
    if (g.beta == 1.0f) return;
    scale_matrix_kernel<<<blocks_for(g.batch * g.m * g.n), kThreadsPerBlock, 0,
                          stream_of(handle)>>>(g.c, g.m, g.n, g.ldc, g.stride_c, g.batch, g.beta);
    LOMO_CUDA_CHECK(cudaGetLastError());
    return;
  }
  const cublasOperation_t op_a = g.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = g.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (g.batch == 1) {
    check_cublas(cublasSgemm_64(handle, op_b, op_a, g.n, g.m, g.k, &g.alpha, g.b, g.ldb, g.a, g.lda,
                                &g.beta, g.c, g.ldc),
                 "cublasSgemm_64");
    return;
  }
  check_cublas(cublasSgemmStridedBatched_64(handle, op_b, op_a, g.n, g.m, g.k, &g.alpha, g.b, g.ldb,
                                            g.stride_b, g.a, g.lda, g.stride_a, &g.beta, g.c, g.ldc,
                                            g.stride_c, g.batch),
               "cublasSgemmStridedBatched_64");
}

namespace {

// One linear-layer product C [m, n] = op(A)·op(B) (+ C when beta = 1), row-major, fp32 output.
struct LinearProduct {
  const char* name;
  bool transpose_a, transpose_b;
  int64_t m, n, k;
  TypedInput a;
  int64_t lda;
  TypedInput b;
  int64_t ldb;
  float beta;
  float* c;
  int64_t ldc;
};

cudaDataType_t cuda_type(DType dtype) {
  return dtype == DType::kBF16 ? CUDA_R_16BF : dtype == DType::kF16 ? CUDA_R_16F : CUDA_R_32F;
}

void run(cublasHandle_t handle, const LinearProduct& p) {
  if (p.a.dtype != p.b.dtype) {
    throw std::invalid_argument(std::string("cuda ") + p.name + ": operands stored as " +
                                std::string(dtype_name(p.a.dtype)) + " and " +
                                std::string(dtype_name(p.b.dtype)) + "; both must have one dtype");
  }
  if (p.a.dtype == DType::kF32 || p.k == 0) {  // k = 0 reads no operand: gemm() scales C
    GemmArgs g;
    g.transpose_a = p.transpose_a, g.transpose_b = p.transpose_b;
    g.m = p.m, g.n = p.n, g.k = p.k;
    g.beta = p.beta;
    g.a = static_cast<const float*>(p.a.data), g.lda = p.lda;
    g.b = static_cast<const float*>(p.b.data), g.ldb = p.ldb;
    g.c = p.c, g.ldc = p.ldc;
    gemm(handle, g);
    return;
  }
  if (p.m < 0 || p.n < 0 || p.k < 0) {
    throw std::invalid_argument(std::string("cuda ") + p.name +
                                ": negative size m=" + std::to_string(p.m) +
                                " n=" + std::to_string(p.n) + " k=" + std::to_string(p.k));
  }
  if (p.m == 0 || p.n == 0) return;
  // Column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, as gemm() above; fp32 accumulation and output.
  const float alpha = 1.0f;
  const cudaDataType_t type = cuda_type(p.a.dtype);
  check_cublas(cublasGemmEx_64(handle, p.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                               p.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, p.n, p.m, p.k, &alpha,
                               p.b.data, type, p.ldb, p.a.data, type, p.lda, &p.beta, p.c,
                               CUDA_R_32F, p.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx_64");
}

}  // namespace

// The three linear-layer products, as kernels/cpu/matmul.cc states them in row-major terms.
void matmul_forward(cublasHandle_t handle, float* y, TypedInput x, TypedInput weight, int64_t m,
                    int64_t n, int64_t k, bool accumulate) {
  run(handle, LinearProduct{"matmul_forward", false, true, m, n, k, x, k, weight, k,
                            accumulate ? 1.0f : 0.0f, y, n});
}

void matmul_backward_input(cublasHandle_t handle, float* dx, TypedInput dy, TypedInput weight,
                           int64_t m, int64_t n, int64_t k, bool accumulate) {
  run(handle, LinearProduct{"matmul_backward_input", false, false, m, k, n, dy, n, weight, k,
                            accumulate ? 1.0f : 0.0f, dx, k});
}

void matmul_backward_weight(cublasHandle_t handle, float* dweight, TypedInput dy, TypedInput x,
                            int64_t m, int64_t n, int64_t k, bool accumulate) {
  run(handle, LinearProduct{"matmul_backward_weight", true, false, n, k, m, dy, n, x, k,
                            accumulate ? 1.0f : 0.0f, dweight, k});
}

}  // namespace lomo::cuda
