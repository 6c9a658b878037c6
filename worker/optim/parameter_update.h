// The per-tensor steps every optimizer shares: preparing a gradient as it arrives from backward,
// and writing an fp32 update back into a parameter's storage dtype.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>

#include "worker/engine/counter_hash.h"
#include "worker/engine/llama_weights.h"
#include "worker/comm/communicator.h"

namespace lomo {

// How a raw gradient (d loss·loss_scale / d p, fp32 from the engine) becomes the one the update
// uses, in DESIGN.md's order: storage-dtype rounding, mean across ranks, unscale, clip by value,
// multiply by the global-norm clip coefficient.
struct GradientPreparation {
  Communicator* communicator = nullptr;  // null: single process
  float inverse_loss_scale = 1.0f;
  std::optional<float> clip_value;
  float clip_coefficient = 1.0f;
};

// Rounds a gradient to the parameter's storage dtype, as a GPU computing in fp16/bf16 would hold
// it: an fp16 gradient beyond ±65504 becomes inf, which is what loss scaling must detect, and tiny
// ones flush to zero, which is what it prevents. A no-op for fp32 parameters.
void round_gradient_to_storage_dtype(const Parameter& parameter, float* gradient);

// Applies the rounding, the rank average and the unscale (not the clipping): the gradient whose
// norm global clipping measures. Returns its sum of squares (double).
double prepare_gradient_for_norm(const Parameter& parameter, float* gradient,
                                 const GradientPreparation& preparation);

// Clip by value, then multiply by the clip coefficient, in place.
void clip_gradient(const Parameter& parameter, float* gradient,
                   const GradientPreparation& preparation);

// Everything in GradientPreparation, in place. Returns the sum of squares before clipping.
inline double prepare_gradient(const Parameter& parameter, float* gradient,
                               const GradientPreparation& preparation) {
  const double sum_squares = prepare_gradient_for_norm(parameter, gradient, preparation);
  clip_gradient(parameter, gradient, preparation);
  return sum_squares;
}

// Writing fp32 results back: round to nearest even, or for bf16 optionally stochastic rounding
// driven by a counter-based hash of (seed, step, tensor, element), so that a resumed run rounds
// exactly as an uninterrupted one without any saved generator state.
struct WriteBack {
  bool stochastic = false;
  uint64_t seed = 0;
  int64_t step = 0;
  int64_t tensor_index = 0;
};

inline uint16_t float_to_bf16_stochastic(float value, uint64_t random) {
  if (!std::isfinite(value)) return float_to_bf16(value);
  // Adding a uniform 16-bit number below the cut and truncating rounds up with probability equal
  // to the discarded fraction: unbiased in expectation.
  const uint32_t bits = std::bit_cast<uint32_t>(value) + static_cast<uint32_t>(random & 0xffffu);
  return static_cast<uint16_t>(bits >> 16);
}

// For every element: p ← update(i, p) in fp32, stored back in the parameter's dtype.
template <typename UpdateFunction>
void update_parameter(Parameter& parameter, const WriteBack& write_back, UpdateFunction update) {
  const int64_t count = parameter.numel();
  switch (parameter.dtype) {
    case DType::kF32: {
      float* p = parameter.storage.as<float>();
#pragma omp parallel for simd schedule(static)
      for (int64_t i = 0; i < count; ++i) p[i] = update(i, p[i]);
      return;
    }
    case DType::kBF16: {
      uint16_t* p = parameter.storage.as<uint16_t>();
      const uint64_t stream = mix_bits(write_back.seed ^ mix_bits(write_back.step) ^
                                       mix_bits(~static_cast<uint64_t>(write_back.tensor_index)));
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < count; ++i) {
        const float value = update(i, bf16_to_float(p[i]));
        p[i] = write_back.stochastic
                   ? float_to_bf16_stochastic(value, mix_bits(stream + static_cast<uint64_t>(i)))
                   : float_to_bf16(value);
      }
      return;
    }
    case DType::kF16: {
      uint16_t* p = parameter.storage.as<uint16_t>();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < count; ++i) p[i] = float_to_fp16(update(i, fp16_to_float(p[i])));
      return;
    }
  }
}

// Root mean square of a parameter's values, in double.
double parameter_rms(const Parameter& parameter);

}  // namespace lomo
