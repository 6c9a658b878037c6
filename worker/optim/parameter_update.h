// The per-tensor gradient preparation every optimizer shares, as a sequence of backend kernels and
// the rank sum: what to call in what order. The arithmetic lives in the kernels
// (kernels/cpu/gradient.h, reduce.h); update rules are kernels too (kernels/backend.h).
#pragma once

#include <cstdint>
#include <optional>

#include "kernels/backend.h"
#include "worker/comm/communicator.h"
#include "worker/engine/llama_weights.h"

namespace lomo {

// How a raw gradient (d loss·loss_scale / d p, fp32 from the engine) becomes the one the update
// uses, in DESIGN.md's order: storage-dtype rounding, sum across ranks, unscale, clip by value,
// multiply by the global-norm clip coefficient. A sum, not a mean: each rank's backward already
// divides by the global token count (data_parallel.h), so the sum is the global batch's gradient.
struct GradientPreparation {
  Communicator* communicator = nullptr;  // null: single process
  float inverse_loss_scale = 1.0f;
  std::optional<float> clip_value;
  float clip_coefficient = 1.0f;
};

// Applies the rounding (to the parameter's storage dtype, as a GPU computing in fp16/bf16 would
// hold the gradient), the rank sum and the unscale (not the clipping): the gradient whose norm
// global clipping measures. Adds its sum of squares to *statistics (device memory) and records
// tensor_index there if that sum is not finite and no earlier tensor's was.
void prepare_gradient_for_norm(Backend& backend, const Parameter& parameter, float* gradient,
                               int64_t tensor_index, const GradientPreparation& preparation,
                               GradientStatistics* statistics);

// Clip by value, then multiply by the clip coefficient, in place.
void clip_gradient(Backend& backend, const Parameter& parameter, float* gradient,
                   const GradientPreparation& preparation);

// Everything in GradientPreparation, in place.
inline void prepare_gradient(Backend& backend, const Parameter& parameter, float* gradient,
                             int64_t tensor_index, const GradientPreparation& preparation,
                             GradientStatistics* statistics) {
  prepare_gradient_for_norm(backend, parameter, gradient, tensor_index, preparation, statistics);
  clip_gradient(backend, parameter, gradient, preparation);
}

}  // namespace lomo
