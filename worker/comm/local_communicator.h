// The communicator of a job with one rank: every collective is complete when issued.
#pragma once

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
  void barrier() override {}
};

}  // namespace lomo
