#include "worker/comm/metered_communicator.h"

#include <chrono>
#include <utility>

namespace lomo {
namespace {

using Clock = std::chrono::steady_clock;

// Adds the time from construction to destruction to `total`, however the scope is left.
class Timed {
 public:
  explicit Timed(std::atomic<int64_t>& total) : total_(total), start_(Clock::now()) {}
  ~Timed() {
    total_ += std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start_).count();
  }
  Timed(const Timed&) = delete;
  Timed& operator=(const Timed&) = delete;

 private:
  std::atomic<int64_t>& total_;
  Clock::time_point start_;
};

class MeteredWork final : public CollectiveWork {
 public:
  MeteredWork(std::unique_ptr<CollectiveWork> inner, std::atomic<int64_t>& nanoseconds)
      : inner_(std::move(inner)), nanoseconds_(nanoseconds) {}
  void wait() override {
    Timed timed(nanoseconds_);
    inner_->wait();
  }
  bool is_done() const override { return inner_->is_done(); }

 private:
  std::unique_ptr<CollectiveWork> inner_;
  std::atomic<int64_t>& nanoseconds_;
};

}  // namespace

CommunicationTotals MeteredCommunicator::totals() const {
  return {static_cast<double>(nanoseconds_.load()) * 1e-9, all_reduce_bytes_.load()};
}

std::unique_ptr<CollectiveWork> MeteredCommunicator::metered(std::unique_ptr<CollectiveWork> work) {
  return std::make_unique<MeteredWork>(std::move(work), nanoseconds_);
}

std::unique_ptr<CollectiveWork> MeteredCommunicator::all_reduce_async(void* data, int64_t count,
                                                                      CommDType dtype,
                                                                      ReduceOp op) {
  if (inner_.world_size() > 1 && count > 0) {
    all_reduce_bytes_ += count * static_cast<int64_t>(comm_dtype_size(dtype));
  }
  Timed timed(nanoseconds_);
  return metered(inner_.all_reduce_async(data, count, dtype, op));
}

std::unique_ptr<CollectiveWork> MeteredCommunicator::broadcast_async(void* data, int64_t bytes,
                                                                     int root) {
  Timed timed(nanoseconds_);
  return metered(inner_.broadcast_async(data, bytes, root));
}

std::unique_ptr<CollectiveWork> MeteredCommunicator::all_gather_async(const void* send, void* recv,
                                                                      int64_t bytes_per_rank) {
  Timed timed(nanoseconds_);
  return metered(inner_.all_gather_async(send, recv, bytes_per_rank));
}

void MeteredCommunicator::barrier() {
  Timed timed(nanoseconds_);
  inner_.barrier();
}

}  // namespace lomo
