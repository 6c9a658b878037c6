// The Backend on the host: every call runs the kernels/cpu/* function of the same name on the
// calling thread (OpenMP and BLAS parallelise inside), so it has returned when the work is done.
#pragma once

#include "kernels/backend.h"

namespace lomo::cpu {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::cpu(); }

  void* allocate(size_t bytes) override;
  void deallocate(void* data) override;
  void copy(void* destination, const void* source, size_t bytes) override;
  void copy_to_host(void* host_destination, const void* source, size_t bytes) override;
  void copy_from_host(void* destination, const void* host_source, size_t bytes) override;
  void fill_zero(void* data, size_t bytes) override;
  void synchronize() override {}

  // kBf16 needs AVX512-BF16 or AMX (throws otherwise, naming the CPU's ISA); kTf32 has no CPU
  // hardware and means kFp32.
  void set_matmul_precision(MatmulPrecision precision) override;

  void convert_to_f32(float* out, const void* in, DType dtype, int64_t count) override;

  void convert_from_f32(void* out, DType dtype, const float* in, int64_t count) override;
  void matmul_forward(float* y, TypedInput x, TypedInput weight, int64_t m, int64_t n, int64_t k,
                      bool accumulate) override;
  void matmul_backward_input(float* dx, TypedInput dy, TypedInput weight, int64_t m, int64_t n,
                             int64_t k, bool accumulate) override;
  void matmul_backward_weight(float* dweight, TypedInput dy, TypedInput x, int64_t m, int64_t n,
                              int64_t k, bool accumulate) override;
  void gemm(const GemmArgs& args) override;

  void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t rows,
                       int64_t dim, float eps) override;
  void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                        const float* weight, const float* rstd, int64_t rows, int64_t dim) override;

  void rope_forward(float* x, const int32_t* positions, const RopeTableView& table, int64_t rows,
                    int64_t num_heads) override;
  void rope_backward(float* dx, const int32_t* positions, const RopeTableView& table, int64_t rows,
                     int64_t num_heads) override;

  int64_t attention_saved_floats(const AttentionShape& shape) override;
  int64_t attention_scratch_floats(const AttentionShape& shape) override;
  void attention_forward(float* out, float* saved, float* scratch, const float* q, const float* k,
                         const float* v, const int32_t* first_key,
                         const AttentionShape& shape) override;
  void attention_backward(float* dq, float* dk, float* dv, float* scratch, const float* dout,
                          const float* saved, const float* q, const float* k, const float* v,
                          const AttentionShape& shape) override;

  void bias_forward(float* y, const float* bias, int64_t rows, int64_t cols) override;
  void bias_backward(float* dbias, const float* dy, int64_t rows, int64_t cols) override;

  void swiglu_forward(float* out, const float* gate, const float* up, int64_t count) override;
  void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                       const float* up, int64_t count) override;

  void embedding_forward(float* out, const int32_t* tokens, TypedInput table, int64_t count,
                         int64_t dim) override;
  void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int64_t count,
                          int64_t dim) override;

  double cross_entropy_forward(float* logsumexp, const float* logits, const int32_t* targets,
                               int64_t rows, int64_t vocab) override;
  void cross_entropy_backward(float* dlogits, const float* logits, const float* logsumexp,
                              const int32_t* targets, int64_t rows, int64_t vocab,
                              float scale) override;

  void round_gradient_to_dtype(float* gradient, int64_t count, DType dtype) override;
  void unscale_gradient(float* gradient, int64_t count, float unscale, int64_t tensor_index,
                        GradientStatistics* statistics) override;
  void clip_gradient(float* gradient, int64_t count, bool clip_by_value, float clip_value,
                     float coefficient) override;

  double sum_squares(const void* x, DType dtype, int64_t count) override;

  void lomo_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                   const SgdUpdate& update, const WriteBack& write_back,
                   const GradientStatistics* skip) override;
  void adalomo_update(void* parameter, DType dtype, int64_t rows, int64_t cols, float* gradient,
                      float* exp_avg_sq_row, float* exp_avg_sq_col, float* exp_avg_sq,
                      const AdaLomoUpdate& update, const WriteBack& write_back,
                      const GradientStatistics* skip) override;
  void adamw_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                    float* exp_avg, float* exp_avg_sq, const AdamWUpdate& update,
                    const WriteBack& write_back, const GradientStatistics* skip) override;

 private:
  MatmulPrecision precision_ = MatmulPrecision::kFp32;
};

}  // namespace lomo::cpu
