// Exponential backoff with jitter for reconnecting to the coordinator: a fleet of workers that
// lost it at the same moment must not all dial again at the same moment.
#pragma once

#include <chrono>
#include <cstdint>
#include <random>

namespace lomo::daemon {

class Backoff {
 public:
  // Delays grow from `initial` by `multiplier` per attempt up to `max`; each delay returned is
  // drawn uniformly from [d/2, d] ("equal jitter"), so it is never zero and never above `max`.
  Backoff(std::chrono::milliseconds initial, std::chrono::milliseconds max, double multiplier = 2.0,
          uint64_t seed = std::random_device{}());

  std::chrono::milliseconds next();
  // After a connection that worked: the next failure waits `initial` again.
  void reset() { current_ = initial_; }

 private:
  std::chrono::milliseconds initial_;
  std::chrono::milliseconds max_;
  double multiplier_;
  std::chrono::milliseconds current_;
  std::mt19937_64 random_;
};

}  // namespace lomo::daemon
