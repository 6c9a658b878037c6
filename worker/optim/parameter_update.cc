#include "worker/optim/parameter_update.h"

namespace lomo {

void prepare_gradient_for_norm(Backend& backend, const Parameter& parameter, float* gradient,
                               int64_t tensor_index, const GradientPreparation& preparation,
                               GradientStatistics* statistics) {
  const int64_t count = parameter.numel();
  backend.round_gradient_to_dtype(gradient, count, parameter.dtype);
  if (preparation.communicator != nullptr) {
    // After the rounding, so that an fp16 overflow on any rank (inf) makes the sum non-finite
    // on every rank and every rank skips the step; see data_parallel.h for why a sum.
    preparation.communicator->all_reduce(gradient, count, ReduceOp::kSum);
  }
  backend.unscale_gradient(gradient, count, preparation.inverse_loss_scale, tensor_index,
                           statistics);
}

void clip_gradient(Backend& backend, const Parameter& parameter, float* gradient,
                   const GradientPreparation& preparation) {
  backend.clip_gradient(gradient, parameter.numel(), preparation.clip_value.has_value(),
                        preparation.clip_value.value_or(0.0f), preparation.clip_coefficient);
}

}  // namespace lomo
