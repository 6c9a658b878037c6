#include "daemon/log.h"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace lomo::daemon {

void log_line(const std::string& text) {
  static std::mutex mutex;
  const auto now = std::chrono::system_clock::now();
  const std::time_t seconds = std::chrono::system_clock::to_time_t(now);
  const auto millis =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &utc);
  std::lock_guard lock(mutex);
  std::fprintf(stderr, "%s.%03dZ lomo-worker: %s\n", stamp, static_cast<int>(millis), text.c_str());
  std::fflush(stderr);
}

}  // namespace lomo::daemon
