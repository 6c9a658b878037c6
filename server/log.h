// One line per event on stderr, with a UTC timestamp: what an operator reads with journalctl or
// kubectl logs.
#pragma once

#include <string>

namespace lomo::server {

void log_line(const std::string& text);

}  // namespace lomo::server
