#include "worker/comm/communicator.h"

#include <cstring>

#include "worker/comm/local_communicator.h"

namespace lomo {

size_t comm_dtype_size(CommDType dtype) {
  switch (dtype) {
    case CommDType::kF32:
      return 4;
    case CommDType::kF64:
    case CommDType::kI64:
      return 8;
  }
  throw std::invalid_argument("unknown communicator dtype");
}

std::string_view comm_dtype_name(CommDType dtype) {
  switch (dtype) {
    case CommDType::kF32:
      return "f32";
    case CommDType::kF64:
      return "f64";
    case CommDType::kI64:
      return "i64";
  }
  return "unknown";
}

const char* collective_kind_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kAllReduce:
      return "all_reduce";
    case CollectiveKind::kBroadcast:
      return "broadcast";
    case CollectiveKind::kAllGather:
      return "all_gather";
    case CollectiveKind::kBarrier:
      return "barrier";
  }
  return "unknown";
}

namespace {
std::string error_message(const std::string& op, std::optional<int> peer,
                          const std::string& detail) {
  std::string message = "collective " + op + " failed";
  if (peer) message += " (peer rank " + std::to_string(*peer) + ")";
  return message + ": " + detail;
}

// A collective that was complete when issued.
class CompletedWork final : public CollectiveWork {
 public:
  void wait() override {}
  bool is_done() const override { return true; }
};
}  // namespace

CommunicatorError::CommunicatorError(std::string op, std::optional<int> peer,
                                     const std::string& detail)
    : std::runtime_error(error_message(op, peer, detail)), op_(std::move(op)), peer_(peer) {}

void LocalCommunicator::throw_if_broken(const std::string& op) const {
  std::lock_guard lock(mutex_);
  if (broken_) throw CommunicatorError(op, 0, "communicator is broken: " + *broken_);
}

void LocalCommunicator::fail(const std::string& op, const std::string& detail) {
  {
    std::lock_guard lock(mutex_);
    if (!broken_) broken_ = op + ": " + detail;
  }
  throw CommunicatorError(op, 0, detail);
}

void LocalCommunicator::abort(const std::string& reason) {
  std::lock_guard lock(mutex_);
  if (!broken_) broken_ = "rank 0 aborted: " + reason;
}

// With one rank, a sum or mean over ranks is the value itself.
std::unique_ptr<CollectiveWork> LocalCommunicator::all_reduce_async(void*, int64_t count, CommDType,
                                                                    ReduceOp) {
  throw_if_broken("all_reduce");
  if (count < 0) fail("all_reduce", "negative count " + std::to_string(count));
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<CollectiveWork> LocalCommunicator::broadcast_async(void*, int64_t bytes, int root) {
  throw_if_broken("broadcast");
  if (root != 0) fail("broadcast", "root rank " + std::to_string(root) + " outside a world of 1");
  if (bytes < 0) fail("broadcast", "negative size " + std::to_string(bytes));
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<CollectiveWork> LocalCommunicator::all_gather_async(const void* send, void* recv,
                                                                    int64_t bytes_per_rank) {
  throw_if_broken("all_gather");
  if (bytes_per_rank < 0) fail("all_gather", "negative size " + std::to_string(bytes_per_rank));
  if (send != recv) std::memmove(recv, send, static_cast<size_t>(bytes_per_rank));
  return std::make_unique<CompletedWork>();
}

void LocalCommunicator::barrier() { throw_if_broken("barrier"); }

}  // namespace lomo
