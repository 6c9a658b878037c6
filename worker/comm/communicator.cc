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

// With one rank, a sum or mean over ranks is the value itself.
std::unique_ptr<CollectiveWork> LocalCommunicator::all_reduce_async(void*, int64_t, CommDType,
                                                                    ReduceOp) {
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<CollectiveWork> LocalCommunicator::broadcast_async(void*, int64_t, int root) {
  if (root != 0) throw CommunicatorError("broadcast", root, "root rank outside a world of 1");
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<CollectiveWork> LocalCommunicator::all_gather_async(const void* send, void* recv,
                                                                    int64_t bytes_per_rank) {
  if (send != recv) std::memcpy(recv, send, static_cast<size_t>(bytes_per_rank));
  return std::make_unique<CompletedWork>();
}

}  // namespace lomo
