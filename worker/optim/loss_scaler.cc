#include "worker/optim/loss_scaler.h"

#include <algorithm>

namespace lomo {

DynamicLossScaler::DynamicLossScaler(const LossScalerOptions& options) : options_(options) {
  state_.scale = options.initial;
}

bool DynamicLossScaler::update(bool overflow) {
  if (overflow) {
    state_.scale = std::max(options_.min, state_.scale / options_.factor);
    state_.clean_steps = 0;
    ++state_.overflows;
    return true;
  }
  if (++state_.clean_steps >= options_.growth_interval) {
    state_.scale *= options_.factor;
    state_.clean_steps = 0;
  }
  return false;
}

}  // namespace lomo
