// The Gloo rendezvous store of a gang rank started by a worker daemon: the coordinator's
// key-value namespace of one job attempt (WorkerService.RendezvousSet/RendezvousGet), reached
// through a `lomo-workerd rendezvous-relay` child process, because this process (the trainer,
// which links libsentencepiece) cannot load gRPC (common/rendezvous_relay.h).
//
// The store lives only while the GlooCommunicator connects: its destructor ends the relay.
#pragma once

#include <gloo/rendezvous/store.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace lomo {

class ChildProcess;

struct CoordinatorStoreOptions {
  std::filesystem::path relay_program;  // lomo-workerd
  std::string coordinator;              // HOST:PORT
  std::string worker_id;
  std::string job_id;
  int64_t attempt = 0;
  // For get() and wait() without a timeout of their own.
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  // When set (a stop signal), a call still waiting for the coordinator gives up within ~100 ms
  // with RendezvousStopped: a rank asked to stop while its peers have not all arrived ends now
  // rather than after the whole rendezvous timeout. Null: never.
  const std::atomic<bool>* stop_requested = nullptr;
};

// A wait for the other ranks that was given up because a stop was requested.
class RendezvousStopped : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class CoordinatorStore final : public gloo::rendezvous::Store {
 public:
  // Starts the relay. Throws std::runtime_error when it cannot be started.
  explicit CoordinatorStore(CoordinatorStoreOptions options);
  ~CoordinatorStore() override;
  CoordinatorStore(const CoordinatorStore&) = delete;
  CoordinatorStore& operator=(const CoordinatorStore&) = delete;

  // All throw std::runtime_error naming the key(s) and the coordinator (and the gRPC status, or
  // the timeout) when the coordinator refuses, cannot be reached, or a key is not set in time.
  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

 private:
  // Sends one request line and returns the relay's values; throws on an error reply.
  std::vector<std::string> call(const std::string& request, std::chrono::milliseconds timeout);
  std::string read_line(std::chrono::steady_clock::time_point deadline);

  CoordinatorStoreOptions options_;
  std::unique_ptr<ChildProcess> relay_;
  std::string pending_;     // bytes read from the relay past the last line
  bool abandoned_ = false;  // a call was given up mid-request: the relay's answer never matters
};

}  // namespace lomo
