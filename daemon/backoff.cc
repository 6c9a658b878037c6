#include "daemon/backoff.h"

#include <algorithm>

namespace lomo::daemon {

Backoff::Backoff(std::chrono::milliseconds initial, std::chrono::milliseconds max,
                 double multiplier, uint64_t seed)
    : initial_(std::max(initial, std::chrono::milliseconds(1))),
      max_(std::max(max, initial_)),
      multiplier_(std::max(multiplier, 1.0)),
      current_(initial_),
      random_(seed) {}

std::chrono::milliseconds Backoff::next() {
  const int64_t ceiling = current_.count();
  std::uniform_int_distribution<int64_t> jitter((ceiling + 1) / 2, ceiling);
  const std::chrono::milliseconds delay(jitter(random_));
  const double grown = static_cast<double>(ceiling) * multiplier_;
  current_ = std::chrono::milliseconds(
      static_cast<int64_t>(std::min(grown, static_cast<double>(max_.count()))));
  return delay;
}

}  // namespace lomo::daemon
