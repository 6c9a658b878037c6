#include "client/eta.h"

#include <cmath>

namespace lomo::client {

void ExponentialMovingAverage::add(double x) {
  last_ = alpha_ * x + (1.0 - alpha_) * last_;
  ++calls_;
}

double ExponentialMovingAverage::value() const {
  if (calls_ == 0) return last_;
  return last_ / (1.0 - std::pow(1.0 - alpha_, static_cast<double>(calls_)));
}

void EtaEstimator::observe(int64_t step, double time_seconds) {
  if (seen_ && step < last_step_) *this = EtaEstimator(smoothing_);
  if (seen_ && step > last_step_ && time_seconds > last_time_) {
    steps_.add(static_cast<double>(step - last_step_));
    seconds_.add(time_seconds - last_time_);
  }
  if (!seen_ || step != last_step_) {
    seen_ = true;
    last_step_ = step;
    last_time_ = time_seconds;
  }
}

std::optional<double> EtaEstimator::eta_seconds(int64_t total_steps) const {
  if (steps_.count() == 0 || total_steps < last_step_) return std::nullopt;
  const double seconds_per_step = seconds_.value() / steps_.value();
  return seconds_per_step * static_cast<double>(total_steps - last_step_);
}

}  // namespace lomo::client
