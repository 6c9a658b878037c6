#include "daemon/rendezvous_relay.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <iostream>

#include "common/fd_io.h"
#include "common/flags.h"
#include "common/rendezvous_relay.h"

namespace lomo::daemon {
namespace {

namespace relay = rendezvous_relay;

relay::Reply answer(const relay::Request& request, CoordinatorRendezvous& rendezvous) {
  relay::Reply reply;
  try {
    if (const auto* set = std::get_if<relay::SetRequest>(&request)) {
      rendezvous.set(set->key, set->value);
    } else {
      const auto& get = std::get<relay::GetRequest>(request);
      reply.values = rendezvous.get(get.keys, get.timeout);
    }
  } catch (const std::exception& e) {
    reply = relay::Reply{false, {}, e.what()};
  }
  return reply;
}

// The reply to one request line (a line that is not a request is answered with an error).
std::string reply_to(const std::string& line, CoordinatorRendezvous& rendezvous) {
  relay::Reply reply;
  try {
    reply = answer(relay::parse_request(line), rendezvous);
  } catch (const std::invalid_argument& e) {
    reply = relay::Reply{false, {}, e.what()};
  }
  return relay::format_reply(reply) + "\n";
}

constexpr const char* kUsage =
    "usage: lomo-workerd rendezvous-relay --coordinator HOST:PORT --worker-id ID --job-id ID "
    "--attempt N\n"
    "  (started by `lomo-worker train --rendezvous coordinator://...`; requests on stdin)\n";

}  // namespace

bool serve_rendezvous_relay(int in_fd, int out_fd, CoordinatorRendezvous& rendezvous) {
  std::string pending;
  char buffer[65536];
  while (true) {
    const ssize_t n = ::read(in_fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return true;  // the trainer closed its end (or is gone)
    pending.append(buffer, static_cast<size_t>(n));
    for (size_t end; (end = pending.find('\n')) != std::string::npos;) {
      const std::string line = pending.substr(0, end);
      pending.erase(0, end + 1);
      if (!write_all(out_fd, reply_to(line, rendezvous))) return false;
    }
  }
}

int rendezvous_relay_command(const std::vector<std::string>& args) {
  CoordinatorRendezvousOptions options;
  try {
    const ParsedFlags parsed =
        parse_flags(args, {.with_value = {"--coordinator", "--worker-id", "--job-id", "--attempt"},
                           .unknown = UnknownFlags::kRefuse});
    if (parsed.help) {
      std::cout << kUsage;
      return 0;
    }
    for (const auto& [flag, value] : parsed.flags) {
      if (flag == "--coordinator") options.coordinator = value;
      if (flag == "--worker-id") options.worker_id = value;
      if (flag == "--job-id") options.job_id = value;
      if (flag == "--attempt") options.attempt = flag_int(flag, value);
    }
    if (options.coordinator.empty() || options.worker_id.empty() || options.job_id.empty() ||
        options.attempt < 1) {
      throw FlagError("--coordinator, --worker-id, --job-id and --attempt (>= 1) are required");
    }
  } catch (const FlagError& e) {
    std::cerr << "lomo-workerd rendezvous-relay: " << e.what() << "\n" << kUsage;
    return 2;
  }
  // A trainer that died mid-reply must not kill the relay with SIGPIPE before it sees EOF.
  ::signal(SIGPIPE, SIG_IGN);
  CoordinatorRendezvous rendezvous(options);
  return serve_rendezvous_relay(STDIN_FILENO, STDOUT_FILENO, rendezvous) ? 0 : 1;
}

}  // namespace lomo::daemon
