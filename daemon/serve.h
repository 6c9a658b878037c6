// `lomo-worker serve` (the lomo-workerd executable): the command line of the worker daemon.
#pragma once

#include <string>
#include <vector>

namespace lomo::daemon {

// Runs the daemon until SIGTERM/SIGINT (graceful; a second one kills the training child).
// Returns the process exit code: 0 after a clean shutdown, 1 when reports were left undelivered
// or the daemon could not start, 2 for bad usage.
int serve_command(const std::vector<std::string>& args);

}  // namespace lomo::daemon
