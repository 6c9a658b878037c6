// Deliberately broken collectives, for the tests that must show their checks can fail: a rank
// that does not take the reduced gradient has to be caught by the comparison of a gang's
// trajectory with the single-process one, and by the trainer's weight-hash check at a checkpoint.
// Used by tests/unit/data_parallel_test.cc (ranks on threads) and, through the LOMO_TEST_FAULT
// environment variable, by `lomo-worker train` (ranks in processes; worker/worker_main.cc). Never
// on unless a test asks for it.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "worker/comm/communicator.h"

namespace lomo {

// Forwards every collective to `inner`; a subclass changes what an f32 all-reduce sends or keeps.
// In a training step the f32 all-reduces are the gradients' (the loss and token totals are f64
// and i64, the weight hashes are all-gathered).
class ForwardingCommunicator : public Communicator {
 public:
  explicit ForwardingCommunicator(std::unique_ptr<Communicator> inner) : inner_(std::move(inner)) {}
  int world_size() const override { return inner_->world_size(); }
  int rank() const override { return inner_->rank(); }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }
  std::unique_ptr<CollectiveWork> all_reduce_async(void* data, int64_t count, CommDType dtype,
                                                   ReduceOp op) override;
  std::unique_ptr<CollectiveWork> broadcast_async(void* data, int64_t bytes, int root) override {
    return inner_->broadcast_async(data, bytes, root);
  }
  std::unique_ptr<CollectiveWork> all_gather_async(const void* send, void* recv,
                                                   int64_t bytes_per_rank) override {
    return inner_->all_gather_async(send, recv, bytes_per_rank);
  }
  void barrier() override { inner_->barrier(); }
  void abort(const std::string& reason) override { inner_->abort(reason); }
  void set_buffer_accountant(MemoryAccountant* accountant) override {
    inner_->set_buffer_accountant(accountant);
  }

 protected:
  virtual std::unique_ptr<CollectiveWork> f32_all_reduce(float* data, int64_t count, ReduceOp op) {
    return inner_->all_reduce_async(data, count, CommDType::kF32, op);
  }

 private:
  std::unique_ptr<Communicator> inner_;
};

// The last rank takes part in every f32 all-reduce (its peers get the true sum) but keeps its own
// values: its gradients are never averaged, so its replica drifts from the others. Other ranks
// and a world of one are unaffected. The collective completes before the call returns.
class LocalValueOnLastRankCommunicator final : public ForwardingCommunicator {
 public:
  using ForwardingCommunicator::ForwardingCommunicator;

 protected:
  std::unique_ptr<CollectiveWork> f32_all_reduce(float* data, int64_t count, ReduceOp op) override;
};

enum class CommunicatorFault {
  kNone,
  kBreakAllReduceOnLastRank,  // LocalValueOnLastRankCommunicator
};

// The variable `lomo-worker train` reads when it connects a rank of a gang.
inline constexpr const char* kTestFaultVariable = "LOMO_TEST_FAULT";

// "" -> kNone, "break_all_reduce_on_last_rank" -> kBreakAllReduceOnLastRank. Throws
// std::invalid_argument for any other name: a misspelt fault must not silently test nothing.
CommunicatorFault parse_communicator_fault(std::string_view name);

// `communicator` with `fault` injected (itself for kNone).
std::unique_ptr<Communicator> with_fault(std::unique_ptr<Communicator> communicator,
                                         CommunicatorFault fault);

}  // namespace lomo
