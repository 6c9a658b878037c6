// A Communicator that measures what its rank spends on collectives, for the per-step figures of
// the trainer (Metrics.communication_seconds / communication_bytes) and the distributed bench.
//
// Time: every second a caller's thread is inside a collective call or a work's wait(), waiting for
// peers included (so a straggler's peers show it). Collectives that run in the background while
// the caller computes cost nothing here: it is the time communication adds to the step.
// Bytes: the payload of every all-reduce (count × element size), as the caller passed it; what the
// ring moves over the wire is 2·(N−1)/N of it per rank. With one rank nothing crosses a rank
// boundary and nothing is counted.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "worker/comm/communicator.h"

namespace lomo {

struct CommunicationTotals {
  double seconds = 0.0;
  int64_t all_reduce_bytes = 0;
};

class MeteredCommunicator final : public Communicator {
 public:
  // `inner` must outlive this communicator.
  explicit MeteredCommunicator(Communicator& inner) : inner_(inner) {}

  // Since construction; the trainer takes differences per step. Safe from any thread.
  CommunicationTotals totals() const;

  int world_size() const override { return inner_.world_size(); }
  int rank() const override { return inner_.rank(); }
  std::chrono::milliseconds timeout() const override { return inner_.timeout(); }
  std::unique_ptr<CollectiveWork> all_reduce_async(void* data, int64_t count, CommDType dtype,
                                                   ReduceOp op) override;
  std::unique_ptr<CollectiveWork> broadcast_async(void* data, int64_t bytes, int root) override;
  std::unique_ptr<CollectiveWork> all_gather_async(const void* send, void* recv,
                                                   int64_t bytes_per_rank) override;
  void barrier() override;
  void abort(const std::string& reason) override { inner_.abort(reason); }
  void set_buffer_accountant(MemoryAccountant* accountant) override {
    inner_.set_buffer_accountant(accountant);
  }

 private:
  std::unique_ptr<CollectiveWork> metered(std::unique_ptr<CollectiveWork> work);

  Communicator& inner_;
  std::atomic<int64_t> nanoseconds_{0};
  std::atomic<int64_t> all_reduce_bytes_{0};
};

}  // namespace lomo
