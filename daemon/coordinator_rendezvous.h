// A gang rank's side of the coordinator's rendezvous (WorkerService.RendezvousSet/RendezvousGet):
// the key-value namespace of one job attempt through which its ranks find each other. Every call
// carries the worker id, job id and attempt the coordinator authorises it by (the worker must own
// a rank of that attempt on a live stream), and has a deadline.
//
// A coordinator that is briefly unreachable (UNAVAILABLE: restarting, a network blip) is retried
// within the call's own time (so is a worker that owns the attempt but whose daemon is
// reconnecting). A restarted coordinator has lost the namespace (it is kept in memory), possibly
// without this rank seeing an error, so while get() waits it sets every key this rank set again, at
// once after an UNAVAILABLE and every `republish_every` anyway: the peers then still find this
// rank. Other errors (PERMISSION_DENIED: the attempt is not this worker's; FAILED_PRECONDITION: it
// has ended) end the call at once.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <map>
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
  // While get() waits, this rank's keys are set again this often (a few small RPCs).
  std::chrono::milliseconds republish_every{1000};
};

class CoordinatorRendezvous {
 public:
  explicit CoordinatorRendezvous(CoordinatorRendezvousOptions options);

  // Retries UNAVAILABLE for up to one rpc_deadline. Throws RendezvousError.
  void set(const std::string& key, const std::string& value);
  // Every key's value, in order, once all are set. Throws RendezvousError when `timeout` passes
  // first or a call fails.
  std::vector<std::string> get(const std::vector<std::string>& keys,
                               std::chrono::milliseconds timeout);

  const CoordinatorRendezvousOptions& options() const { return options_; }

 private:
  [[noreturn]] void fail(const std::string& what, const grpc::Status& status) const;
  grpc::Status try_set(const std::string& key, const std::string& value);
  // Sets every key this rank has set again; false if the coordinator is still unreachable.
  bool republish();

  CoordinatorRendezvousOptions options_;
  std::map<std::string, std::string> published_;  // what this rank set, to set again
  bool republish_pending_ = false;  // an UNAVAILABLE was seen since the keys were last set
  std::chrono::steady_clock::time_point last_published_{};
  std::unique_ptr<lomo::v1::WorkerService::Stub> stub_;
};

}  // namespace lomo::daemon
