#include "common/log.h"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace lomo {
namespace {

struct LogSettings {
  std::mutex mutex;  // also keeps lines from different threads whole and in one order
  std::string program = "lomo";
  LogFormat format = LogFormat::kText;
};

LogSettings& settings() {
  static LogSettings instance;
  return instance;
}

std::string utc_timestamp() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t seconds = std::chrono::system_clock::to_time_t(now);
  const auto millis =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &utc);
  char text[48];
  std::snprintf(text, sizeof(text), "%s.%03dZ", stamp, static_cast<int>(millis));
  return text;
}

}  // namespace

void set_log_program(const std::string& program) {
  std::lock_guard lock(settings().mutex);
  settings().program = program;
}

void set_log_format(LogFormat format) {
  std::lock_guard lock(settings().mutex);
  settings().format = format;
}

LogFormat parse_log_format(const std::string& text) {
  if (text == "text") return LogFormat::kText;
  if (text == "json") return LogFormat::kJson;
  throw std::invalid_argument("log format must be text or json, got \"" + text + "\"");
}

void log_line(const std::string& text) {
  const std::string time = utc_timestamp();
  LogSettings& log = settings();
  std::lock_guard lock(log.mutex);
  if (log.format == LogFormat::kJson) {
    const nlohmann::json line{{"time", time}, {"program", log.program}, {"message", text}};
    // Replacement characters for invalid UTF-8 rather than an exception: a log line never throws.
    std::fprintf(stderr, "%s\n",
                 line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    std::fprintf(stderr, "%s %s: %s\n", time.c_str(), log.program.c_str(), text.c_str());
  }
  std::fflush(stderr);
}

}  // namespace lomo
