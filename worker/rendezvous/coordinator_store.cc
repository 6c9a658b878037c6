#include "worker/rendezvous/coordinator_store.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <stdexcept>

#include "common/child_process.h"
#include "common/fd_io.h"
#include "common/rendezvous_relay.h"

namespace lomo {
namespace {

namespace relay = rendezvous_relay;
using Clock = std::chrono::steady_clock;

// A reply may take up to the request's own timeout plus one RPC deadline (the relay's, 10 s) on
// top: past that the relay is stuck, and waiting longer would only hide it.
constexpr std::chrono::seconds kReplyMargin{15};

}  // namespace

CoordinatorStore::CoordinatorStore(CoordinatorStoreOptions options) : options_(std::move(options)) {
  // A relay that died must turn the next request into an error, not end this process.
  std::signal(SIGPIPE, SIG_IGN);
  ChildOptions child;
  child.argv = {options_.relay_program.string(),
                "rendezvous-relay",
                "--coordinator",
                options_.coordinator,
                "--worker-id",
                options_.worker_id,
                "--job-id",
                options_.job_id,
                "--attempt",
                std::to_string(options_.attempt)};
  child.stdin_pipe = true;
  child.stdout_mode = ChildOutput::kPipe;  // the replies; its diagnostics share our stderr
  child.parent_death_signal = SIGKILL;
  relay_ = std::make_unique<ChildProcess>(child);
}

CoordinatorStore::~CoordinatorStore() {
  if (abandoned_) {
    relay_->terminate(std::chrono::seconds(1));
    return;
  }
  // End of file ends the relay; a relay stuck in a call is not waited for long.
  relay_->close_stdin();
  if (!relay_->wait_for(std::chrono::seconds(2))) relay_->terminate(std::chrono::seconds(1));
}

std::string CoordinatorStore::read_line(Clock::time_point deadline) {
  while (true) {
    if (const size_t end = pending_.find('\n'); end != std::string::npos) {
      std::string line = pending_.substr(0, end);
      pending_.erase(0, end + 1);
      return line;
    }
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      throw std::runtime_error("the rendezvous relay (" + options_.relay_program.string() +
                               ") did not answer in time");
    }
    if (options_.stop_requested != nullptr && options_.stop_requested->load()) {
      abandoned_ = true;
      throw RendezvousStopped("stopped while waiting for the other ranks at the coordinator " +
                              options_.coordinator);
    }
    pollfd fd{relay_->stdout_fd(), POLLIN, 0};
    if (::poll(&fd, 1, static_cast<int>(std::min<int64_t>(left.count(), 100))) <= 0) continue;
    char buffer[65536];
    const ssize_t n = ::read(relay_->stdout_fd(), buffer, sizeof(buffer));
    if (n > 0) {
      pending_.append(buffer, static_cast<size_t>(n));
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
      const std::optional<ExitStatus> ended = relay_->wait_for(std::chrono::seconds(1));
      throw std::runtime_error("the rendezvous relay (" + options_.relay_program.string() + ") " +
                               (ended ? ended->describe() : "closed its output") +
                               " without answering");
    }
  }
}

std::vector<std::string> CoordinatorStore::call(const std::string& request,
                                                std::chrono::milliseconds timeout) {
  if (!write_all(relay_->stdin_fd(), request + "\n")) {
    throw std::runtime_error("cannot write to the rendezvous relay (" +
                             options_.relay_program.string() + "): it has ended");
  }
  const relay::Reply reply = relay::parse_reply(read_line(Clock::now() + timeout + kReplyMargin));
  if (!reply.ok) throw std::runtime_error(reply.error);
  return reply.values;
}

void CoordinatorStore::set(const std::string& key, const std::vector<char>& data) {
  call(relay::format_request(relay::SetRequest{key, std::string(data.begin(), data.end())}),
       std::chrono::milliseconds(0));
}

std::vector<char> CoordinatorStore::get(const std::string& key) {
  const std::vector<std::string> values =
      call(relay::format_request(relay::GetRequest{{key}, options_.timeout}), options_.timeout);
  if (values.size() != 1) throw std::runtime_error("the rendezvous relay answered badly");
  return {values[0].begin(), values[0].end()};
}

void CoordinatorStore::wait(const std::vector<std::string>& keys) { wait(keys, options_.timeout); }

void CoordinatorStore::wait(const std::vector<std::string>& keys,
                            const std::chrono::milliseconds& timeout) {
  if (keys.empty()) return;
  // The relay's get returns the values, which a wait does not need; they are small (addresses).
  call(relay::format_request(relay::GetRequest{keys, timeout}), timeout);
}

}  // namespace lomo
