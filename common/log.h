// The one log of every lomo program (lomo-coordinator, lomo-workerd): one line per event on
// stderr, with a UTC timestamp and the program's name, safe from any thread. What an operator
// reads with journalctl or kubectl logs:
//
//   2026-11-26T13:40:02.123Z lomo-coordinator: job job-1a2b3c4d5e6f: QUEUED -> ASSIGNED (...)
//
// or, with LogFormat::kJson, one JSON object per line for log collectors:
//
//   {"time":"2026-11-26T13:40:02.123Z","program":"lomo-coordinator","message":"job ..."}
#pragma once

#include <string>

namespace lomo {

enum class LogFormat { kText, kJson };

// Set once by main before its threads start; later calls are safe, lines already written keep
// the old settings. Defaults: program "lomo", LogFormat::kText.
void set_log_program(const std::string& program);
void set_log_format(LogFormat format);
// "text" or "json"; throws std::invalid_argument naming the choices otherwise.
LogFormat parse_log_format(const std::string& text);

void log_line(const std::string& text);

}  // namespace lomo
