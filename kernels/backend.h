// The compute seam: everything the engine and the optimizers run on a device goes through one
// Backend, so the CPU and (in a later issue) CUDA implementations are interchangeable and every
// kernel test can run against each of them (tests/unit/backend_kernels_test.cc).
//
// A Backend is the device context of one device: it owns what that device's kernels need. The CPU
// backend needs nothing beyond OpenMP's thread pool and BLAS. A CUDA backend holds its stream
// (every call below is queued on it in order and may return before the work is done), its library
// handles (cuBLAS, cuDNN) and its scratch memory.
//
// Conventions for every call:
// - Pointers are in this backend's device memory (host memory for the CPU), except where a
//   parameter says host. Arithmetic is fp32; shapes are row-major.
// - Calls on one backend run in issue order. A value returned to the host (a double) or a
//   copy_to_host waits for the work before it: on a GPU that is a synchronisation, so the engine
//   and the optimizers keep such reads to once per forward / backward pass.
// - Results are deterministic for a given thread count (resume is bit-identical).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/device.h"
#include "kernels/dtype.h"
#include "kernels/kernel_types.h"
#include "kernels/rope_table.h"

namespace lomo {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;

  // ---- Memory and ordering --------------------------------------------------------------------
  // 64-byte aligned, uninitialised; throws std::bad_alloc. Accounting is the caller's (Buffer).
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* data) = 0;
  virtual void copy(void* destination, const void* source, size_t bytes) = 0;
  virtual void copy_to_host(void* host_destination, const void* source, size_t bytes) = 0;
  virtual void copy_from_host(void* destination, const void* host_source, size_t bytes) = 0;
  virtual void fill_zero(void* data, size_t bytes) = 0;
  // Returns when every call issued so far has finished.
  virtual void synchronize() = 0;

  // ---- Settings ---------------------------------------------------------------------------------
  // How fp32 matrix products may round their inputs: kFp32 keeps every bit; kTf32 lets a GPU use
  // TF32 tensor cores (inputs rounded to 10 mantissa bits, fp32 accumulation; several times
  // faster, ~1e-3 relative). A backend without such hardware ignores it. The trainer asks for
  // kTf32 when the weights are stored in bf16/fp16, whose 7/10 mantissa bits are no finer. On the
  // CUDA backend the setting covers every cuBLAS product, attention's (fp32 activations) too.
  // kBf16: the linear layers' products take bf16 inputs with fp32 accumulation and fp32 output.
  // The CPU rounds fp32 operands to bf16 inside each call (AVX512-BF16/AMX; CpuBackend throws when
  // the CPU has neither); attention's batched products stay fp32. The CUDA backend multiplies on
  // bf16 tensor cores and asks the caller for bf16 operands (product_dtype()), so bf16 weights are
  // used as stored, never widened; its fp32 products (attention's) then run in TF32.
  enum class MatmulPrecision : uint8_t { kFp32, kTf32, kBf16 };
  virtual void set_matmul_precision(MatmulPrecision precision) { (void)precision; }
  // The dtype the linear layers' operands must have under the present precision: kF32, or kBF16
  // on a backend that multiplies stored bf16 (CUDA with kBf16). The engine narrows activations to
  // it with convert_from_f32 and passes weights already in it as they are.
  virtual DType product_dtype() const { return DType::kF32; }

  // ---- Dtype ----------------------------------------------------------------------------------
  // out[i] = float(in[i]) for `count` values stored as `dtype` (weights widened before use).
  virtual void convert_to_f32(float* out, const void* in, DType dtype, int64_t count) = 0;
  // out[i] = in[i] rounded to nearest even in `dtype` (a copy for kF32).
  virtual void convert_from_f32(void* out, DType dtype, const float* in, int64_t count) = 0;

  // ---- Matrix products: a linear layer y = x·Wᵀ, x [m, k], W [n, k], y [m, n] ------------------
  // Operands are fp32, or all of the backend's product_dtype(); a backend throws
  // std::invalid_argument for any other mix. Outputs are fp32.
  // y = x·Wᵀ (or y += x·Wᵀ when accumulate).
  virtual void matmul_forward(float* y, TypedInput x, TypedInput weight, int64_t m, int64_t n,
                              int64_t k, bool accumulate) = 0;
  // dx = dy·W (or +=).
  virtual void matmul_backward_input(float* dx, TypedInput dy, TypedInput weight, int64_t m,
                                     int64_t n, int64_t k, bool accumulate) = 0;
  // dW = dyᵀ·x (or +=).
  virtual void matmul_backward_weight(float* dweight, TypedInput dy, TypedInput x, int64_t m,
                                      int64_t n, int64_t k, bool accumulate) = 0;
  // The general (strided batched) product attention is built from; see GemmArgs.
  virtual void gemm(const GemmArgs& args) = 0;

  // ---- RMSNorm: y = w ∘ x / sqrt(mean(x²) + eps) over rows of `dim` ----------------------------
  // rstd [rows] receives 1/rms for backward.
  virtual void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight,
                               int64_t rows, int64_t dim, float eps) = 0;
  // Adds the input gradient to dx; overwrites dweight [dim].
  virtual void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                                const float* weight, const float* rstd, int64_t rows,
                                int64_t dim) = 0;

  // ---- Rotary embeddings on x [rows, num_heads, head_dim] in place; positions [rows] ----------
  // The table (cos/sin) is in this backend's memory too.
  virtual void rope_forward(float* x, const int32_t* positions, const RopeTableView& table,
                            int64_t rows, int64_t num_heads) = 0;
  virtual void rope_backward(float* dx, const int32_t* positions, const RopeTableView& table,
                             int64_t rows, int64_t num_heads) = 0;

  // ---- Causal grouped-query attention (kernels/cpu/attention.h has the layouts) ----------------
  // What forward saves for backward is the backend's own, so only the same backend reads it; both
  // save each row's log-sum-exp and each query's first key, O(B·heads·T), and recompute the
  // probabilities in backward (the CPU in 64-query blocks, scratch two such tiles per thread;
  // CUDA in chunks, kernels/cuda/attention_plan.h). The caller allocates `saved` and `scratch` with
  // these sizes (memory stays countable); one scratch serves both passes and holds nothing between
  // calls.
  virtual int64_t attention_saved_floats(const AttentionShape& shape) = 0;
  virtual int64_t attention_scratch_floats(const AttentionShape& shape) = 0;
  // first_key: null, or [batch·seq_len] first attendable key position of each query (packing).
  virtual void attention_forward(float* out, float* saved, float* scratch, const float* q,
                                 const float* k, const float* v, const int32_t* first_key,
                                 const AttentionShape& shape) = 0;
  // Overwrites dq, dk, dv; leaves saved and the inputs intact (backward may run twice).
  virtual void attention_backward(float* dq, float* dk, float* dv, float* scratch,
                                  const float* dout, const float* saved, const float* q,
                                  const float* k, const float* v, const AttentionShape& shape) = 0;

  // ---- Bias of a linear layer (kernels/cpu/bias.h): y [rows, cols] ----------------------------
  // y[r, c] += bias[c].
  virtual void bias_forward(float* y, const float* bias, int64_t rows, int64_t cols) = 0;
  // dbias[c] = Σ_r dy[r, c]; overwrites dbias [cols]. Deterministic.
  virtual void bias_backward(float* dbias, const float* dy, int64_t rows, int64_t cols) = 0;

  // ---- SwiGLU: out = silu(gate) ∘ up -----------------------------------------------------------
  virtual void swiglu_forward(float* out, const float* gate, const float* up, int64_t count) = 0;
  // Overwrites dgate and dup.
  virtual void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                               const float* up, int64_t count) = 0;

  // ---- Embedding: out[i] = float(table[tokens[i]]) (tokens validated by the caller) ------------
  virtual void embedding_forward(float* out, const int32_t* tokens, TypedInput table, int64_t count,
                                 int64_t dim) = 0;
  // Adds each row's gradient into its token's row of dtable.
  virtual void embedding_backward(float* dtable, const float* dout, const int32_t* tokens,
                                  int64_t count, int64_t dim) = 0;

  // ---- Cross-entropy over logits [rows, vocab]; targets kIgnoreIndex are skipped --------------
  // Fills logsumexp [rows]; returns Σ −log softmax[target] (host value: waits for the work).
  virtual double cross_entropy_forward(float* logsumexp, const float* logits,
                                       const int32_t* targets, int64_t rows, int64_t vocab) = 0;
  // dlogits = scale·(softmax − onehot), 0 for ignored rows; dlogits may alias logits.
  virtual void cross_entropy_backward(float* dlogits, const float* logits, const float* logsumexp,
                                      const int32_t* targets, int64_t rows, int64_t vocab,
                                      float scale) = 0;

  // ---- Gradient preparation (kernels/cpu/gradient.h) --------------------------------------------
  virtual void round_gradient_to_dtype(float* gradient, int64_t count, DType dtype) = 0;
  // gradient ← gradient·unscale; adds Σgradient² to *statistics (device memory) and records
  // tensor_index there if that sum is not finite and no earlier tensor's was.
  virtual void unscale_gradient(float* gradient, int64_t count, float unscale, int64_t tensor_index,
                                GradientStatistics* statistics) = 0;
  virtual void clip_gradient(float* gradient, int64_t count, bool clip_by_value, float clip_value,
                             float coefficient) = 0;

  // ---- Reductions ------------------------------------------------------------------------------
  // Σx² in double of `count` values stored as `dtype` (host value: waits for the work).
  virtual double sum_squares(const void* x, DType dtype, int64_t count) = 0;

  // ---- Update rules: fp32 arithmetic, written back into the parameter's storage dtype ----------
  // Each does nothing when `skip` (device memory, may be null) records a non-finite gradient.
  // LOMO / SGD: p ← p·keep − step·g.
  virtual void lomo_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                           const SgdUpdate& update, const WriteBack& write_back,
                           const GradientStatistics* skip) = 0;
  // AdaLomo (kernels/cpu/adalomo_update.h): a matrix [rows, cols] with factored moments, or a
  // vector of `rows` values (cols = 0) with a full one. Overwrites gradient.
  virtual void adalomo_update(void* parameter, DType dtype, int64_t rows, int64_t cols,
                              float* gradient, float* exp_avg_sq_row, float* exp_avg_sq_col,
                              float* exp_avg_sq, const AdaLomoUpdate& update,
                              const WriteBack& write_back, const GradientStatistics* skip) = 0;
  virtual void adamw_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                            float* exp_avg, float* exp_avg_sq, const AdamWUpdate& update,
                            const WriteBack& write_back, const GradientStatistics* skip) = 0;
};

// The backend of `device`; throws std::invalid_argument when this build has none for it.
Backend& backend_for(Device device);
// Every device this build and machine can compute on (the CPU always; GPUs with the CUDA backend).
std::vector<Device> available_backends();

// One small value of type T in a backend's device memory, not counted by any accountant (a few
// bytes: per-pass statistics, flags). read() copies it to the host: on a GPU, a synchronisation.
template <typename T>
class DeviceValue {
 public:
  DeviceValue(Backend& backend, const T& initial) : backend_(&backend) {
    data_ = static_cast<T*>(backend.allocate(sizeof(T)));
    write(initial);
  }
  ~DeviceValue() {
    if (data_ != nullptr) backend_->deallocate(data_);
  }
  DeviceValue(DeviceValue&& other) noexcept
      : backend_(other.backend_), data_(std::exchange(other.data_, nullptr)) {}
  DeviceValue(const DeviceValue&) = delete;
  DeviceValue& operator=(const DeviceValue&) = delete;
  DeviceValue& operator=(DeviceValue&&) = delete;

  T* get() const { return data_; }
  void write(const T& value) { backend_->copy_from_host(data_, &value, sizeof(T)); }
  T read() const {
    T value;
    backend_->copy_to_host(&value, data_, sizeof(T));
    return value;
  }

 private:
  Backend* backend_;
  T* data_ = nullptr;
};

}  // namespace lomo
