// A gang rank's side of the coordinator's rendezvous (WorkerService.RendezvousSet/RendezvousGet):
// the key-value namespace of one job attempt through which its ranks find each other. Every call
// carries the worker id, job id and attempt the coordinator authorises it by (the worker must own
// a rank of that attempt on a live stream), and has a deadline.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "lomo/v1/workers.grpc.pb.h"

namespace lomo::daemon {

// A rendezvous call that failed; what() names the key(s), the coordinator and the gRPC status (or
// the timeout).
class RendezvousError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct CoordinatorRendezvousOptions {
  std::string coordinator;  // HOST:PORT of its gRPC endpoint
  std::string worker_id;
  std::string job_id;
  int64_t attempt = 0;
  // get() polls (RendezvousGet answers at once) with a backoff from the first to the last value,
  // doubling: a quick first answer when the peers are there, a light load when they are not.
  std::chrono::milliseconds first_poll{5};
  std::chrono::milliseconds last_poll{100};
  // Bounds each RPC (a get's own timeout bounds its polling).
  std::chrono::milliseconds rpc_deadline{10000};
};

class CoordinatorRendezvous {
 public:
  explicit CoordinatorRendezvous(CoordinatorRendezvousOptions options);

  // Throws RendezvousError.
  void set(const std::string& key, const std::string& value);
  // Every key's value, in order, once all are set. Throws RendezvousError when `timeout` passes
  // first or a call fails.
  std::vector<std::string> get(const std::vector<std::string>& keys,
                               std::chrono::milliseconds timeout);

  const CoordinatorRendezvousOptions& options() const { return options_; }

 private:
  [[noreturn]] void fail(const std::string& what, const grpc::Status& status) const;

  CoordinatorRendezvousOptions options_;
  std::unique_ptr<lomo::v1::WorkerService::Stub> stub_;
};

}  // namespace lomo::daemon
