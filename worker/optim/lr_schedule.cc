#include "worker/optim/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <stdexcept>

namespace lomo {

LrSchedule LrSchedule::make(const std::string& kind_name, double peak_lr, int64_t warmup_steps,
                            double warmup_ratio, int64_t total_steps) {
  LrSchedule s;
  if (kind_name == "constant") {
    s.kind = Kind::kConstant;
  } else if (kind_name == "linear") {
    s.kind = Kind::kLinear;
  } else if (kind_name == "cosine") {
    s.kind = Kind::kCosine;
  } else {
    throw std::invalid_argument("unknown learning-rate schedule '" + kind_name + "'");
  }
  s.peak_lr = peak_lr;
  s.total_steps = std::max<int64_t>(1, total_steps);
  s.warmup_steps = warmup_steps > 0 ? warmup_steps
                                    : static_cast<int64_t>(std::ceil(warmup_ratio * s.total_steps));
  return s;
}

double LrSchedule::at(int64_t step) const {
  if (step <= warmup_steps) return peak_lr * static_cast<double>(step) / (warmup_steps + 1);
  if (kind == Kind::kConstant) return peak_lr;
  const double span = std::max<int64_t>(1, total_steps - warmup_steps);
  // The first step after warmup runs at the peak and the last one just above 0: no step is wasted
  // with a zero learning rate.
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps - 1) / span);
  if (kind == Kind::kLinear) return peak_lr * (1.0 - progress);
  return peak_lr * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

}  // namespace lomo
