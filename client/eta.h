// The time left of a job, smoothed the way tqdm smooths its rate: exponential moving averages of
// the steps done and the seconds taken between updates (smoothing 0.3, tqdm's default), so that
// one slow step (an evaluation, a checkpoint) moves the ETA a little instead of making it jump.
#pragma once

#include <cstdint>
#include <optional>

namespace lomo::client {

// tqdm's EMA: last = alpha * x + (1 - alpha) * last, read with the start-up bias removed
// (divided by 1 - (1 - alpha)^calls), so the first value is x itself rather than alpha * x.
class ExponentialMovingAverage {
 public:
  explicit ExponentialMovingAverage(double smoothing = 0.3) : alpha_(smoothing) {}
  void add(double x);
  // The bias-corrected average; 0 before the first add().
  double value() const;
  int64_t count() const { return calls_; }

 private:
  double alpha_;
  double last_ = 0.0;
  int64_t calls_ = 0;
};

// Seconds left from (step, time) updates. A step below the last one (an attempt resumed from an
// earlier checkpoint) starts the estimate again.
class EtaEstimator {
 public:
  explicit EtaEstimator(double smoothing = 0.3) : smoothing_(smoothing) {}
  // `time_seconds`: when `step` was logged. Updates that go back in time or do no step are
  // ignored for the rate (they carry no duration to average).
  void observe(int64_t step, double time_seconds);
  // Seconds to reach `total_steps` at the smoothed rate; nullopt before two updates.
  std::optional<double> eta_seconds(int64_t total_steps) const;

 private:
  double smoothing_;
  ExponentialMovingAverage steps_{smoothing_};
  ExponentialMovingAverage seconds_{smoothing_};
  bool seen_ = false;
  int64_t last_step_ = 0;
  double last_time_ = 0.0;
};

}  // namespace lomo::client
