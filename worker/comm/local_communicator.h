// The communicator of a job with one rank: every collective is complete when issued.
#pragma once

#include <mutex>
#include <optional>
#include <string>

#include "worker/comm/communicator.h"

namespace lomo {

class LocalCommunicator final : public Communicator {
 public:
  int world_size() const override { return 1; }
  int rank() const override { return 0; }
  std::chrono::milliseconds timeout() const override { return std::chrono::milliseconds::max(); }
  std::unique_ptr<CollectiveWork> all_reduce_async(void* data, int64_t count, CommDType dtype,
                                                   ReduceOp op) override;
  std::unique_ptr<CollectiveWork> broadcast_async(void* data, int64_t bytes, int root) override;
  std::unique_ptr<CollectiveWork> all_gather_async(const void* send, void* recv,
                                                   int64_t bytes_per_rank) override;
  void barrier() override;
  void abort(const std::string& reason) override;

 private:
  // Throws if an earlier call failed or abort() was called: the contract's "broken" state.
  void throw_if_broken(const std::string& op) const;
  // Records the failure, then throws it.
  [[noreturn]] void fail(const std::string& op, const std::string& detail);

  mutable std::mutex mutex_;           // abort() may come from another thread
  std::optional<std::string> broken_;  // why the communicator is broken
};

}  // namespace lomo
