// `lomo-workerd rendezvous-relay`: the coordinator's rendezvous for a training process that cannot
// speak gRPC itself (common/rendezvous_relay.h says why and defines the lines). A gang rank's
// trainer starts it as a child, writes requests to its stdin and reads the replies from its
// stdout; it ends at end of file on stdin (or with its parent: the trainer gives it a
// parent-death signal). Diagnostics go to stderr only.
//
//   lomo-workerd rendezvous-relay --coordinator HOST:PORT --worker-id W --job-id J --attempt A
#pragma once

#include <string>
#include <vector>

#include "daemon/coordinator_rendezvous.h"

namespace lomo::daemon {

// Answers every request line read from `in_fd` on `out_fd`, until end of file on `in_fd` (returns
// true) or a write that fails (false: the reader is gone). A request that fails becomes an error
// reply, not the end of the relay.
bool serve_rendezvous_relay(int in_fd, int out_fd, CoordinatorRendezvous& rendezvous);

// The subcommand; its exit code (2 for a bad command line).
int rendezvous_relay_command(const std::vector<std::string>& args);

}  // namespace lomo::daemon
