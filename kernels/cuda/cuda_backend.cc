#include "kernels/cuda/cuda_backend.h"

#include <cstdint>
#include <new>
#include <string>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/bias.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/matmul.h"
#include "kernels/cuda/reduce.h"
#include "kernels/cuda/rmsnorm.h"
#include "kernels/cuda/rope.h"
#include "kernels/cuda/swiglu.h"
#include "kernels/cuda/update.h"

namespace lomo::cuda {
namespace {

// cuBLAS's recommended workspace on Hopper (its documentation: 32 MiB for sm_90); smaller
// architectures need less, and a larger one is never used.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;

void check_cublas(cublasStatus_t status, const char* expression, int index) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw CudaError("cuda:" + std::to_string(index) + ": " + expression + " failed: " +
                    cublasGetStatusName(status) + " (" + cublasGetStatusString(status) + ")");
  }
}

}  // namespace

CudaBackend::CudaBackend(int index) : index_(index) {
  try {
    LOMO_CUDA_CHECK(cudaSetDevice(index_));
    LOMO_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));

    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = index_;
    LOMO_CUDA_CHECK(cudaMemPoolCreate(&pool_, &props));
    // Keep freed memory in the pool for reuse instead of returning it at each synchronisation.
    uint64_t threshold = UINT64_MAX;
    LOMO_CUDA_CHECK(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &threshold));

    LOMO_CUDA_CHECK(cudaMalloc(&cublas_workspace_, kCublasWorkspaceBytes));
    LOMO_CUDA_CHECK(
        cudaMalloc(reinterpret_cast<void**>(&partials_), (kReductionBlocks + 1) * sizeof(double)));
    result_ = partials_ + kReductionBlocks;

    check_cublas(cublasCreate(&cublas_), "cublasCreate", index_);
    check_cublas(cublasSetStream(cublas_, stream_), "cublasSetStream", index_);
    // After cublasSetStream, which resets the workspace to cuBLAS's own.
    check_cublas(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspaceBytes),
                 "cublasSetWorkspace", index_);
    // fp32 products in fp32 (no TF32), so results stay within fp32 tolerance of the CPU.
    check_cublas(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode", index_);
    check_cublas(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode",
                 index_);
  } catch (...) {
    release();
    throw;
  }
}

CudaBackend::~CudaBackend() { release(); }

// Best effort: errors here have nowhere to go (the registry never destroys its backends).
void CudaBackend::release() noexcept {
  cudaSetDevice(index_);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  cudaFree(cublas_workspace_);
  cudaFree(partials_);
  if (pool_ != nullptr) cudaMemPoolDestroy(pool_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  cublas_ = nullptr, cublas_workspace_ = nullptr, partials_ = nullptr, result_ = nullptr;
  pool_ = nullptr, stream_ = nullptr;
  cudaGetLastError();  // leave no error of ours for the thread's next check
}

void CudaBackend::activate() const { LOMO_CUDA_CHECK(cudaSetDevice(index_)); }

// ---- Memory and ordering ------------------------------------------------------------------------

void* CudaBackend::try_allocate(size_t bytes, cudaError_t* status) {
  void* data = nullptr;
  *status = cudaMallocFromPoolAsync(&data, bytes, pool_, stream_);
  return *status == cudaSuccess ? data : nullptr;
}

void* CudaBackend::allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  activate();
  cudaError_t status;
  void* data = try_allocate(bytes, &status);
  if (status == cudaErrorMemoryAllocation) {
    // The pool may hold free blocks too fragmented for this request: wait for pending frees,
    // give every unused block back to the driver, and try once more.
    cudaGetLastError();
    LOMO_CUDA_CHECK(cudaStreamSynchronize(stream_));
    LOMO_CUDA_CHECK(cudaMemPoolTrimTo(pool_, 0));
    data = try_allocate(bytes, &status);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // not sticky, but leave no error behind for the next check
      throw std::bad_alloc();
    }
  }
  LOMO_CUDA_CHECK(status);
  return data;
}

void CudaBackend::deallocate(void* data) {
  if (data == nullptr) return;
  activate();
  LOMO_CUDA_CHECK(cudaFreeAsync(data, stream_));
}

void CudaBackend::copy(void* destination, const void* source, size_t bytes) {
  if (bytes == 0) return;
  activate();
  LOMO_CUDA_CHECK(cudaMemcpyAsync(destination, source, bytes, cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::copy_to_host(void* host_destination, const void* source, size_t bytes) {
  if (bytes == 0) return;
  activate();
  LOMO_CUDA_CHECK(
      cudaMemcpyAsync(host_destination, source, bytes, cudaMemcpyDeviceToHost, stream_));
  LOMO_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// Waits for the copy, so the caller may free or change the host source as soon as this returns.
void CudaBackend::copy_from_host(void* destination, const void* host_source, size_t bytes) {
  if (bytes == 0) return;
  activate();
  LOMO_CUDA_CHECK(
      cudaMemcpyAsync(destination, host_source, bytes, cudaMemcpyHostToDevice, stream_));
  LOMO_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::fill_zero(void* data, size_t bytes) {
  if (bytes == 0) return;
  activate();
  LOMO_CUDA_CHECK(cudaMemsetAsync(data, 0, bytes, stream_));
}

void CudaBackend::synchronize() {
  activate();
  LOMO_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

double CudaBackend::read_result() {
  double value = 0.0;
  LOMO_CUDA_CHECK(
      cudaMemcpyAsync(&value, result_, sizeof(double), cudaMemcpyDeviceToHost, stream_));
  LOMO_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return value;
}

// ---- Kernels: each queues the lomo::cuda function of the same name on the stream ----------------

void CudaBackend::convert_to_f32(float* out, const void* in, DType dtype, int64_t count) {
  activate();
  cuda::convert_to_f32(out, in, dtype, count, stream_);
}

void CudaBackend::convert_from_f32(void* out, DType dtype, const float* in, int64_t count) {
  activate();
  cuda::convert_from_f32(out, dtype, in, count, stream_);
}

void CudaBackend::matmul_forward(float* y, TypedInput x, TypedInput weight, int64_t m, int64_t n,
                                 int64_t k, bool accumulate) {
  activate();
  cuda::matmul_forward(cublas_, y, x, weight, m, n, k, accumulate);
}
void CudaBackend::matmul_backward_input(float* dx, TypedInput dy, TypedInput weight, int64_t m,
                                        int64_t n, int64_t k, bool accumulate) {
  activate();
  cuda::matmul_backward_input(cublas_, dx, dy, weight, m, n, k, accumulate);
}
void CudaBackend::matmul_backward_weight(float* dweight, TypedInput dy, TypedInput x, int64_t m,
                                         int64_t n, int64_t k, bool accumulate) {
  activate();
  cuda::matmul_backward_weight(cublas_, dweight, dy, x, m, n, k, accumulate);
}
void CudaBackend::gemm(const GemmArgs& args) {
  activate();
  cuda::gemm(cublas_, args);
}

void CudaBackend::rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight,
                                  int64_t rows, int64_t dim, float eps) {
  activate();
  cuda::rmsnorm_forward(out, rstd, x, weight, rows, dim, eps, stream_);
}
void CudaBackend::rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                                   const float* weight, const float* rstd, int64_t rows,
                                   int64_t dim) {
  activate();
  cuda::rmsnorm_backward(dx, dweight, dout, x, weight, rstd, rows, dim, stream_);
}

void CudaBackend::rope_forward(float* x, const int32_t* positions, const RopeTableView& table,
                               int64_t rows, int64_t num_heads) {
  activate();
  cuda::rope_forward(x, positions, table, rows, num_heads, stream_);
}
void CudaBackend::rope_backward(float* dx, const int32_t* positions, const RopeTableView& table,
                                int64_t rows, int64_t num_heads) {
  activate();
  cuda::rope_backward(dx, positions, table, rows, num_heads, stream_);
}

int64_t CudaBackend::attention_saved_floats(const AttentionShape& shape) {
  return cuda::attention_saved_floats(shape);
}
int64_t CudaBackend::attention_scratch_floats(const AttentionShape& shape) {
  return cuda::attention_scratch_floats(shape);
}
void CudaBackend::attention_forward(float* out, float* saved, float* scratch, const float* q,
                                    const float* k, const float* v, const int32_t* first_key,
                                    const AttentionShape& shape) {
  activate();
  cuda::attention_forward(cublas_, out, saved, scratch, q, k, v, first_key, shape, stream_);
}
void CudaBackend::attention_backward(float* dq, float* dk, float* dv, float* scratch,
                                     const float* dout, const float* saved, const float* q,
                                     const float* k, const float* v, const AttentionShape& shape) {
  activate();
  cuda::attention_backward(cublas_, dq, dk, dv, scratch, dout, saved, q, k, v, shape, stream_);
}

void CudaBackend::bias_forward(float* y, const float* bias, int64_t rows, int64_t cols) {
  activate();
  cuda::bias_forward(y, bias, rows, cols, stream_);
}
void CudaBackend::bias_backward(float* dbias, const float* dy, int64_t rows, int64_t cols) {
  activate();
  cuda::bias_backward(dbias, dy, rows, cols, stream_);
}

void CudaBackend::swiglu_forward(float* out, const float* gate, const float* up, int64_t count) {
  activate();
  cuda::swiglu_forward(out, gate, up, count, stream_);
}
void CudaBackend::swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                                  const float* up, int64_t count) {
  activate();
  cuda::swiglu_backward(dgate, dup, dout, gate, up, count, stream_);
}

void CudaBackend::embedding_forward(float* out, const int32_t* tokens, TypedInput table,
                                    int64_t count, int64_t dim) {
  activate();
  cuda::embedding_forward(out, tokens, table.data, table.dtype, count, dim, stream_);
}
void CudaBackend::embedding_backward(float* dtable, const float* dout, const int32_t* tokens,
                                     int64_t count, int64_t dim) {
  activate();
  cuda::embedding_backward(dtable, dout, tokens, count, dim, stream_);
}

double CudaBackend::cross_entropy_forward(float* logsumexp, const float* logits,
                                          const int32_t* targets, int64_t rows, int64_t vocab) {
  activate();
  cuda::cross_entropy_forward(result_, logsumexp, logits, targets, rows, vocab, stream_);
  return read_result();
}
void CudaBackend::cross_entropy_backward(float* dlogits, const float* logits,
                                         const float* logsumexp, const int32_t* targets,
                                         int64_t rows, int64_t vocab, float scale) {
  activate();
  cuda::cross_entropy_backward(dlogits, logits, logsumexp, targets, rows, vocab, scale, stream_);
}

void CudaBackend::round_gradient_to_dtype(float* gradient, int64_t count, DType dtype) {
  activate();
  cuda::round_gradient_to_dtype(gradient, count, dtype, stream_);
}
void CudaBackend::unscale_gradient(float* gradient, int64_t count, float unscale,
                                   int64_t tensor_index, GradientStatistics* statistics) {
  activate();
  cuda::unscale_gradient(gradient, count, unscale, tensor_index, statistics, partials_, stream_);
}
void CudaBackend::clip_gradient(float* gradient, int64_t count, bool clip_by_value,
                                float clip_value, float coefficient) {
  activate();
  cuda::clip_gradient(gradient, count, clip_by_value, clip_value, coefficient, stream_);
}

double CudaBackend::sum_squares(const void* x, DType dtype, int64_t count) {
  activate();
  cuda::sum_squares(result_, x, dtype, count, partials_, stream_);
  return read_result();
}

void CudaBackend::lomo_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                              const SgdUpdate& update, const WriteBack& write_back,
                              const GradientStatistics* skip) {
  activate();
  cuda::lomo_update(parameter, dtype, count, gradient, update, write_back, skip, stream_);
}
void CudaBackend::adalomo_update(void* parameter, DType dtype, int64_t rows, int64_t cols,
                                 float* gradient, float* exp_avg_sq_row, float* exp_avg_sq_col,
                                 float* exp_avg_sq, const AdaLomoUpdate& update,
                                 const WriteBack& write_back, const GradientStatistics* skip) {
  activate();
  cuda::adalomo_update(parameter, dtype, rows, cols, gradient, exp_avg_sq_row, exp_avg_sq_col,
                       exp_avg_sq, update, write_back, skip, partials_, stream_);
}
void CudaBackend::adamw_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                               float* exp_avg, float* exp_avg_sq, const AdamWUpdate& update,
                               const WriteBack& write_back, const GradientStatistics* skip) {
  activate();
  cuda::adamw_update(parameter, dtype, count, gradient, exp_avg, exp_avg_sq, update, write_back,
                     skip, stream_);
}

uint64_t CudaBackend::pool_reserved_high_bytes() const {
  uint64_t high = 0;
  LOMO_CUDA_CHECK(cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrReservedMemHigh, &high));
  return high;
}

void CudaBackend::set_matmul_precision(MatmulPrecision precision) {
  LOMO_CUDA_CHECK(cudaSetDevice(index_));
  // Under kBf16 the linear layers multiply bf16 operands (cublasGemmEx, fp32 accumulation); the
  // fp32 products left (attention's) may then round to TF32, which is finer than bf16.
  check_cublas(
      cublasSetMathMode(cublas_, precision == MatmulPrecision::kFp32 ? CUBLAS_DEFAULT_MATH
                                                                     : CUBLAS_TF32_TENSOR_OP_MATH),
      "cublasSetMathMode", index_);
  product_dtype_ = precision == MatmulPrecision::kBf16 ? DType::kBF16 : DType::kF32;
}

}  // namespace lomo::cuda
