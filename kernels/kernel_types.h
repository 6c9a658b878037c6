// Plain parameter types shared by the Backend interface and every backend's kernels.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace lomo {

// Targets equal to this (PyTorch's and Hugging Face's −100) contribute neither loss nor gradient.
inline constexpr int32_t kIgnoreIndex = -100;

struct AttentionShape {
  int64_t batch = 0;
  int64_t seq_len = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  // Sliding-window attention (Mistral): query i attends to keys (i − sliding_window, i] only, as
  // transformers' `kv_idx > q_idx − sliding_window`; 0 leaves the window unlimited.
  int64_t sliding_window = 0;
};

// An input that may be stored narrower than fp32: an operand of a linear-layer product
// (Backend::matmul_*: fp32, or the backend's product_dtype()) or an embedding table (any storage
// dtype, widened as it is read). Converts implicitly from const float*, so an fp32 call site
// reads as before.
struct TypedInput {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  TypedInput(const float* values) : data(values) {}  // NOLINT(google-explicit-constructor)
  TypedInput(const void* values, DType type) : data(values), dtype(type) {}
};

// Row-major C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i] for i < batch, where X[i] starts at
// x + i·stride_x: one product, or the strided batch of per-head products attention is made of.
struct GemmArgs {
  bool transpose_a = false, transpose_b = false;
  int64_t m = 0, n = 0, k = 0;
  float alpha = 1.0f, beta = 0.0f;
  const float* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const float* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
};

// How an update kernel writes fp32 results back into a bf16/fp16/fp32 parameter: round to nearest
// even, or for bf16 optionally stochastic rounding driven by a counter-based hash of
// (seed, step, tensor, element), so a resumed run rounds exactly as an uninterrupted one.
struct WriteBack {
  bool stochastic = false;
  uint64_t seed = 0;
  int64_t step = 0;
  int64_t tensor_index = 0;
};

// What gradient kernels accumulate during one backward pass, kept in device memory so that the
// host reads it once per pass instead of once per tensor (one synchronisation on a GPU).
struct GradientStatistics {
  double sum_squares = 0.0;       // Σ over the checked tensors of their sums of squares
  int64_t first_non_finite = -1;  // tensor index of the first checked tensor with inf/NaN; −1: none
};

// Scalars of the fused LOMO/SGD update p ← p·keep − step·g.
struct SgdUpdate {
  float keep = 1.0f;  // 1 − lr·weight_decay, or 1 without decay
  float step = 0.0f;  // lr
};

// Scalars of AdaLomo's update (Lv et al. 2023b; see kernels/cpu/adalomo_update.h).
struct AdaLomoUpdate {
  double lr = 0.0;
  double beta = 0.0;            // second-moment decay 1 − t^decay_rate
  double eps1 = 1e-30;          // added to g² in the moments
  double eps2 = 1e-3;           // floor of the parameter RMS in the relative step
  double clip_threshold = 1.0;  // update normalisation d: U ← U / max(1, RMS(U)/d)
  double weight_decay = 0.0;    // decoupled, 0 when the tensor does not decay
};

// Scalars of AdamW's update (PyTorch's, fp32 state), t the 1-based applied-update count.
struct AdamWUpdate {
  float beta1 = 0.9f, beta2 = 0.999f;
  float correction1 = 1.0f, correction2 = 1.0f;  // 1 − beta^t
  float step = 0.0f;                             // lr
  float eps = 1e-8f;
  float keep = 1.0f;  // 1 − lr·weight_decay, or 1 without decay
};

}  // namespace lomo
