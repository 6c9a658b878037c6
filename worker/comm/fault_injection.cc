#include "worker/comm/fault_injection.h"

#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

namespace lomo {
namespace {

// A collective that had completed when it was returned.
struct CompletedWork final : CollectiveWork {
  void wait() override {}
  bool is_done() const override { return true; }
};

constexpr std::string_view kBreakAllReduceOnLastRank = "break_all_reduce_on_last_rank";

}  // namespace

std::unique_ptr<CollectiveWork> ForwardingCommunicator::all_reduce_async(void* data, int64_t count,
                                                                         CommDType dtype,
                                                                         ReduceOp op) {
  if (dtype != CommDType::kF32) return inner_->all_reduce_async(data, count, dtype, op);
  return f32_all_reduce(static_cast<float*>(data), count, op);
}

std::unique_ptr<CollectiveWork> LocalValueOnLastRankCommunicator::f32_all_reduce(float* data,
                                                                                 int64_t count,
                                                                                 ReduceOp op) {
  const bool keep_local = rank() == world_size() - 1 && world_size() > 1;
  std::vector<float> local;
  if (keep_local) local.assign(data, data + count);
  ForwardingCommunicator::f32_all_reduce(data, count, op)->wait();
  if (keep_local) std::memcpy(data, local.data(), local.size() * sizeof(float));
  return std::make_unique<CompletedWork>();
}

CommunicatorFault parse_communicator_fault(std::string_view name) {
  if (name.empty()) return CommunicatorFault::kNone;
  if (name == kBreakAllReduceOnLastRank) return CommunicatorFault::kBreakAllReduceOnLastRank;
  throw std::invalid_argument(std::string(kTestFaultVariable) + "=" + std::string(name) +
                              ": unknown fault (known: " + std::string(kBreakAllReduceOnLastRank) +
                              ")");
}

std::unique_ptr<Communicator> with_fault(std::unique_ptr<Communicator> communicator,
                                         CommunicatorFault fault) {
  switch (fault) {
    case CommunicatorFault::kNone:
      return communicator;
    case CommunicatorFault::kBreakAllReduceOnLastRank:
      return std::make_unique<LocalValueOnLastRankCommunicator>(std::move(communicator));
  }
  return communicator;
}

}  // namespace lomo
