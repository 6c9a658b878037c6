// lomo-workerd: the worker daemon. Started as `lomo-worker serve ...` (which executes this file
// with --trainer naming itself); see serve.h for the options. `lomo-workerd rendezvous-relay` is
// the coordinator's rendezvous for a gang rank's trainer, which cannot link gRPC
// (rendezvous_relay.h).
#include <iostream>
#include <string>
#include <vector>

#include "common/log.h"
#include "common/version.h"
#include "daemon/rendezvous_relay.h"
#include "daemon/serve.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (lomo::asks_for_version(args)) {
    std::cout << lomo::version_text("lomo-workerd");
    return 0;
  }
  if (!args.empty() && args.front() == "rendezvous-relay") {
    lomo::set_log_program("lomo-workerd rendezvous-relay");
    return lomo::daemon::rendezvous_relay_command({args.begin() + 1, args.end()});
  }
  lomo::set_log_program("lomo-worker");
  return lomo::daemon::serve_command(args);
}
