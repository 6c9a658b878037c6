// The daemon's own log: one line per event on stderr, with a UTC timestamp, safe from any thread.
#pragma once

#include <string>

namespace lomo::daemon {

void log_line(const std::string& text);

}  // namespace lomo::daemon
