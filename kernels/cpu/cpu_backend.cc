#include "kernels/cpu/cpu_backend.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "kernels/cpu/adalomo_update.h"
#include "kernels/cpu/adamw_update.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/bias.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/gemm_dispatch.h"
#include "kernels/cpu/gradient.h"
#include "kernels/cpu/lomo_update.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/reduce.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/swiglu.h"

namespace lomo::cpu {

void* CpuBackend::allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  // aligned_alloc wants a multiple of the alignment; 64 bytes is a cache line and an AVX-512 row.
  void* data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (data == nullptr) throw std::bad_alloc();
  return data;
}

void CpuBackend::deallocate(void* data) { std::free(data); }

void CpuBackend::copy(void* destination, const void* source, size_t bytes) {
  std::memcpy(destination, source, bytes);
}
void CpuBackend::copy_to_host(void* host_destination, const void* source, size_t bytes) {
  std::memcpy(host_destination, source, bytes);
}
void CpuBackend::copy_from_host(void* destination, const void* host_source, size_t bytes) {
  std::memcpy(destination, host_source, bytes);
}
void CpuBackend::fill_zero(void* data, size_t bytes) { std::memset(data, 0, bytes); }

void CpuBackend::convert_to_f32(float* out, const void* in, DType dtype, int64_t count) {
  convert_to_float(dtype, in, out, static_cast<size_t>(count));
}

void CpuBackend::convert_from_f32(void* out, DType dtype, const float* in, int64_t count) {
  convert_from_float(dtype, in, out, static_cast<size_t>(count));
}

void CpuBackend::set_matmul_precision(MatmulPrecision precision) {
  if (precision == MatmulPrecision::kBf16 && !bf16_matmul_supported()) {
    throw std::runtime_error(
        "matmul precision bf16 needs AVX512-BF16 or AMX-BF16; this CPU offers neither (oneDNN "
        "ISA " +
        gemm_kernel().isa + "): use fp32");
  }
  precision_ = precision;
}

// The CPU multiplies fp32 operands (its bf16 mode rounds them inside gemm_bf16), so
// product_dtype() stays kF32 and anything else is a caller's mistake.
namespace {
const float* fp32_operand(TypedInput operand, const char* product) {
  if (operand.dtype != DType::kF32) {
    throw std::invalid_argument(std::string("cpu ") + product + ": operand stored as " +
                                std::string(dtype_name(operand.dtype)) +
                                "; the CPU backend multiplies fp32 operands");
  }
  return static_cast<const float*>(operand.data);
}
}  // namespace

void CpuBackend::matmul_forward(float* y, TypedInput x_operand, TypedInput weight_operand,
                                int64_t m, int64_t n, int64_t k, bool accumulate) {
  const float* x = fp32_operand(x_operand, "matmul_forward");
  const float* weight = fp32_operand(weight_operand, "matmul_forward");
  if (precision_ == MatmulPrecision::kBf16) {
    gemm_bf16(false, true, m, n, k, x, k, weight, k, accumulate, y, n);
    return;
  }
  cpu::matmul_forward(y, x, weight, m, n, k, accumulate);
}
void CpuBackend::matmul_backward_input(float* dx, TypedInput dy_operand, TypedInput weight_operand,
                                       int64_t m, int64_t n, int64_t k, bool accumulate) {
  const float* dy = fp32_operand(dy_operand, "matmul_backward_input");
  const float* weight = fp32_operand(weight_operand, "matmul_backward_input");
  if (precision_ == MatmulPrecision::kBf16) {
    gemm_bf16(false, false, m, k, n, dy, n, weight, k, accumulate, dx, k);
    return;
  }
  cpu::matmul_backward_input(dx, dy, weight, m, n, k, accumulate);
}
void CpuBackend::matmul_backward_weight(float* dweight, TypedInput dy_operand, TypedInput x_operand,
                                        int64_t m, int64_t n, int64_t k, bool accumulate) {
  const float* dy = fp32_operand(dy_operand, "matmul_backward_weight");
  const float* x = fp32_operand(x_operand, "matmul_backward_weight");
  if (precision_ == MatmulPrecision::kBf16) {
    gemm_bf16(true, false, n, k, m, dy, n, x, k, accumulate, dweight, k);
    return;
  }
  cpu::matmul_backward_weight(dweight, dy, x, m, n, k, accumulate);
}
void CpuBackend::gemm(const GemmArgs& g) {
  for (int64_t i = 0; i < g.batch; ++i) {
    cpu::gemm(g.transpose_a, g.transpose_b, g.m, g.n, g.k, g.alpha, g.a + i * g.stride_a, g.lda,
              g.b + i * g.stride_b, g.ldb, g.beta, g.c + i * g.stride_c, g.ldc);
  }
}

void CpuBackend::rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight,
                                 int64_t rows, int64_t dim, float eps) {
  cpu::rmsnorm_forward(out, rstd, x, weight, rows, dim, eps);
}
void CpuBackend::rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                                  const float* weight, const float* rstd, int64_t rows,
                                  int64_t dim) {
  cpu::rmsnorm_backward(dx, dweight, dout, x, weight, rstd, rows, dim);
}

void CpuBackend::rope_forward(float* x, const int32_t* positions, const RopeTableView& table,
                              int64_t rows, int64_t num_heads) {
  cpu::rope_forward(x, positions, table, rows, num_heads);
}
void CpuBackend::rope_backward(float* dx, const int32_t* positions, const RopeTableView& table,
                               int64_t rows, int64_t num_heads) {
  cpu::rope_backward(dx, positions, table, rows, num_heads);
}

// The probabilities are what the CPU kernels save; its forward needs no scratch.
int64_t CpuBackend::attention_saved_floats(const AttentionShape& shape) {
  return cpu::attention_saved_floats(shape);
}
int64_t CpuBackend::attention_scratch_floats(const AttentionShape& shape) {
  return cpu::attention_scratch_floats(shape);
}
void CpuBackend::attention_forward(float* out, float* saved, float* scratch, const float* q,
                                   const float* k, const float* v, const int32_t* first_key,
                                   const AttentionShape& shape) {
  cpu::attention_forward(out, saved, scratch, q, k, v, first_key, shape);
}
void CpuBackend::attention_backward(float* dq, float* dk, float* dv, float* scratch,
                                    const float* dout, const float* saved, const float* q,
                                    const float* k, const float* v, const AttentionShape& shape) {
  cpu::attention_backward(dq, dk, dv, scratch, dout, saved, q, k, v, shape);
}

void CpuBackend::bias_forward(float* y, const float* bias, int64_t rows, int64_t cols) {
  cpu::bias_forward(y, bias, rows, cols);
}
void CpuBackend::bias_backward(float* dbias, const float* dy, int64_t rows, int64_t cols) {
  cpu::bias_backward(dbias, dy, rows, cols);
}

void CpuBackend::swiglu_forward(float* out, const float* gate, const float* up, int64_t count) {
  cpu::swiglu_forward(out, gate, up, count);
}
void CpuBackend::swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                                 const float* up, int64_t count) {
  cpu::swiglu_backward(dgate, dup, dout, gate, up, count);
}

void CpuBackend::embedding_forward(float* out, const int32_t* tokens, TypedInput table,
                                   int64_t count, int64_t dim) {
  cpu::embedding_forward(out, tokens, table.data, table.dtype, count, dim);
}
void CpuBackend::embedding_backward(float* dtable, const float* dout, const int32_t* tokens,
                                    int64_t count, int64_t dim) {
  cpu::embedding_backward(dtable, dout, tokens, count, dim);
}

double CpuBackend::cross_entropy_forward(float* logsumexp, const float* logits,
                                         const int32_t* targets, int64_t rows, int64_t vocab) {
  return cpu::cross_entropy_forward(logsumexp, logits, targets, rows, vocab);
}
void CpuBackend::cross_entropy_backward(float* dlogits, const float* logits, const float* logsumexp,
                                        const int32_t* targets, int64_t rows, int64_t vocab,
                                        float scale) {
  cpu::cross_entropy_backward(dlogits, logits, logsumexp, targets, rows, vocab, scale);
}

void CpuBackend::round_gradient_to_dtype(float* gradient, int64_t count, DType dtype) {
  cpu::round_gradient_to_dtype(gradient, count, dtype);
}
void CpuBackend::unscale_gradient(float* gradient, int64_t count, float unscale,
                                  int64_t tensor_index, GradientStatistics* statistics) {
  cpu::unscale_gradient(gradient, count, unscale, tensor_index, statistics);
}
void CpuBackend::clip_gradient(float* gradient, int64_t count, bool clip_by_value, float clip_value,
                               float coefficient) {
  cpu::clip_gradient(gradient, count, clip_by_value, clip_value, coefficient);
}

double CpuBackend::sum_squares(const void* x, DType dtype, int64_t count) {
  return cpu::sum_squares(x, dtype, count);
}

void CpuBackend::lomo_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                             const SgdUpdate& update, const WriteBack& write_back,
                             const GradientStatistics* skip) {
  cpu::lomo_update(parameter, dtype, count, gradient, update, write_back, skip);
}
void CpuBackend::adalomo_update(void* parameter, DType dtype, int64_t rows, int64_t cols,
                                float* gradient, float* exp_avg_sq_row, float* exp_avg_sq_col,
                                float* exp_avg_sq, const AdaLomoUpdate& update,
                                const WriteBack& write_back, const GradientStatistics* skip) {
  cpu::adalomo_update(parameter, dtype, rows, cols, gradient, exp_avg_sq_row, exp_avg_sq_col,
                      exp_avg_sq, update, write_back, skip);
}
void CpuBackend::adamw_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                              float* exp_avg, float* exp_avg_sq, const AdamWUpdate& update,
                              const WriteBack& write_back, const GradientStatistics* skip) {
  cpu::adamw_update(parameter, dtype, count, gradient, exp_avg, exp_avg_sq, update, write_back,
                    skip);
}

}  // namespace lomo::cpu
