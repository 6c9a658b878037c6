// lomo-workerd: the worker daemon. Started as `lomo-worker serve ...` (which executes this file
// with --trainer naming itself); see serve.h for the options.
#include <string>
#include <vector>

#include "common/log.h"
#include "daemon/serve.h"

int main(int argc, char** argv) {
  lomo::set_log_program("lomo-worker");
  return lomo::daemon::serve_command(std::vector<std::string>(argv + 1, argv + argc));
}
