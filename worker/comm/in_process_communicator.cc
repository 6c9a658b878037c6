#include "worker/comm/in_process_communicator.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

namespace lomo {
namespace {

using Clock = std::chrono::steady_clock;

using Kind = CollectiveKind;

// now + timeout, capped at a year so that a timeout of milliseconds::max() means "no timeout"
// without overflowing the clock.
Clock::time_point deadline_after(std::chrono::milliseconds timeout) {
  constexpr auto kYear = std::chrono::hours(24 * 365);
  return Clock::now() + std::min<Clock::duration>(timeout, kYear);
}

using Arrival = CollectiveCall;  // one rank's call

// The n-th collective of every rank.
struct Slot {
  std::vector<std::optional<Arrival>> arrivals;
  int arrived = 0;
  bool done = false;
};

// What broke the group: the rank at fault and why.
struct Failure {
  int peer;
  std::string detail;
};

// Element-wise op over the ranks' buffers, summed in rank order so that every rank receives the
// same bits, then written to every rank.
template <typename T>
void reduce_in_rank_order(const std::vector<std::optional<Arrival>>& arrivals, int64_t count,
                          ReduceOp op) {
  const auto n = static_cast<size_t>(count);
  std::vector<T> result(static_cast<const T*>(arrivals[0]->data),
                        static_cast<const T*>(arrivals[0]->data) + n);
  for (size_t r = 1; r < arrivals.size(); ++r) {
    const T* values = static_cast<const T*>(arrivals[r]->data);
    for (size_t i = 0; i < n; ++i) {
      if constexpr (std::is_integral_v<T>) {
        // Two's-complement wrap on overflow instead of undefined behaviour.
        result[i] =
            static_cast<T>(static_cast<uint64_t>(result[i]) + static_cast<uint64_t>(values[i]));
      } else {
        result[i] += values[i];
      }
    }
  }
  if (op == ReduceOp::kMean) {
    const auto world = static_cast<T>(arrivals.size());
    for (T& value : result) value /= world;
  }
  for (const auto& arrival : arrivals) std::memcpy(arrival->data, result.data(), n * sizeof(T));
}

// State shared by the ranks of one world. Every member is guarded by mutex.
class Group {
 public:
  Group(int world_size, std::chrono::milliseconds timeout)
      : world_size_(world_size), timeout_(timeout) {}

  int world_size() const { return world_size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  // Records rank's sequence-th collective; performs it if rank is the last to arrive. Throws at
  // once if the group is broken.
  std::shared_ptr<Slot> arrive(int rank, uint64_t sequence, const Arrival& arrival) {
    std::lock_guard lock(mutex_);
    throw_if_failed(collective_kind_name(arrival.kind));
    auto& slot = slots_[sequence];
    if (!slot) {
      slot = std::make_shared<Slot>();
      slot->arrivals.resize(static_cast<size_t>(world_size_));
    }
    auto result = slot;
    slot->arrivals[static_cast<size_t>(rank)] = arrival;
    if (++slot->arrived == world_size_) {
      slots_.erase(sequence);
      complete(*result);
    }
    return result;
  }

  // Blocks until slot is done (returns), the group fails, or the deadline passes (both throw).
  void wait(const Slot& slot, uint64_t sequence, Kind kind, Clock::time_point deadline) {
    std::unique_lock lock(mutex_);
    const bool settled =
        changed_.wait_until(lock, deadline, [&] { return slot.done || failure_.has_value(); });
    if (slot.done) return;
    if (!settled) fail_locked(missing_peer(slot, sequence, kind));
    throw_if_failed(collective_kind_name(kind));
  }

  bool is_done(const Slot& slot, Clock::time_point deadline) {
    std::lock_guard lock(mutex_);
    return slot.done || failure_.has_value() || Clock::now() >= deadline;
  }

  // Breaks the group with the first failure; later failures are consequences of it.
  void fail(Failure failure) {
    std::lock_guard lock(mutex_);
    fail_locked(std::move(failure));
  }

 private:
  void throw_if_failed(const std::string& op) const {
    if (failure_) throw CommunicatorError(op, failure_->peer, failure_->detail);
  }

  void fail_locked(Failure failure) {
    if (!failure_) failure_ = std::move(failure);
    changed_.notify_all();
  }

  // The failure a timeout reports: the first rank that never issued this collective.
  Failure missing_peer(const Slot& slot, uint64_t sequence, Kind kind) const {
    std::string missing;
    int first = -1;
    int count = 0;
    for (int r = 0; r < world_size_; ++r) {
      if (slot.arrivals[static_cast<size_t>(r)]) continue;
      if (first < 0) first = r;
      missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      ++count;
    }
    return {first, (count == 1 ? "rank " : "ranks ") + missing + " did not join " +
                       collective_kind_name(kind) + " #" + std::to_string(sequence) + " within " +
                       std::to_string(timeout_.count()) + " ms"};
  }

  // Every rank must have asked for the same collective; names the first rank that did not.
  std::optional<Failure> disagreement(const Slot& slot) const {
    const Arrival& first = *slot.arrivals[0];
    for (int r = 1; r < world_size_; ++r) {
      const Arrival& other = *slot.arrivals[static_cast<size_t>(r)];
      std::string what;
      if (other.kind != first.kind) {
        what = std::string("issued ") + collective_kind_name(other.kind) + " where rank 0 issued " +
               collective_kind_name(first.kind);
      } else if (other.count != first.count) {
        what = "gave count " + std::to_string(other.count) + " where rank 0 gave " +
               std::to_string(first.count);
      } else if (first.kind == Kind::kAllReduce && other.dtype != first.dtype) {
        what = "gave dtype " + std::string(comm_dtype_name(other.dtype)) + " where rank 0 gave " +
               std::string(comm_dtype_name(first.dtype));
      } else if (first.kind == Kind::kAllReduce && other.op != first.op) {
        what = "gave a different reduce op than rank 0";
      } else if (first.kind == Kind::kBroadcast && other.root != first.root) {
        what = "gave root " + std::to_string(other.root) + " where rank 0 gave " +
               std::to_string(first.root);
      }
      if (!what.empty()) return Failure{r, "rank " + std::to_string(r) + " " + what};
    }
    return std::nullopt;
  }

  void complete(Slot& slot) {
    if (auto failure = disagreement(slot)) return fail_locked(std::move(*failure));
    const Arrival& first = *slot.arrivals[0];
    // An empty collective moves nothing (its buffers may be null).
    const Kind kind = first.count == 0 ? Kind::kBarrier : first.kind;
    switch (kind) {
      case Kind::kAllReduce:
        switch (first.dtype) {
          case CommDType::kF32:
            reduce_in_rank_order<float>(slot.arrivals, first.count, first.op);
            break;
          case CommDType::kF64:
            reduce_in_rank_order<double>(slot.arrivals, first.count, first.op);
            break;
          case CommDType::kI64:
            reduce_in_rank_order<int64_t>(slot.arrivals, first.count, first.op);
            break;
        }
        break;
      case Kind::kBroadcast: {
        const void* source = slot.arrivals[static_cast<size_t>(first.root)]->data;
        for (const auto& arrival : slot.arrivals) {
          if (arrival->data != source) {
            std::memcpy(arrival->data, source, static_cast<size_t>(first.count));
          }
        }
        break;
      }
      case Kind::kAllGather: {
        const auto bytes = static_cast<size_t>(first.count);
        for (const auto& destination : slot.arrivals) {
          auto* recv = static_cast<unsigned char*>(destination->data);
          // memmove: a rank may gather in place (send inside its own recv).
          for (size_t s = 0; s < slot.arrivals.size(); ++s) {
            std::memmove(recv + s * bytes, slot.arrivals[s]->send, bytes);
          }
        }
        break;
      }
      case Kind::kBarrier:
        break;
    }
    slot.done = true;
    changed_.notify_all();
  }

  const int world_size_;
  const std::chrono::milliseconds timeout_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<uint64_t, std::shared_ptr<Slot>> slots_;  // issued by some ranks, not yet by all
  std::optional<Failure> failure_;
};

class InProcessWork final : public CollectiveWork {
 public:
  InProcessWork(std::shared_ptr<Group> group, std::shared_ptr<Slot> slot, uint64_t sequence,
                Kind kind, Clock::time_point deadline)
      : group_(std::move(group)),
        slot_(std::move(slot)),
        sequence_(sequence),
        kind_(kind),
        deadline_(deadline) {}

  void wait() override { group_->wait(*slot_, sequence_, kind_, deadline_); }
  bool is_done() const override { return group_->is_done(*slot_, deadline_); }

 private:
  std::shared_ptr<Group> group_;
  std::shared_ptr<Slot> slot_;
  uint64_t sequence_;
  Kind kind_;
  Clock::time_point deadline_;
};

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Group> group, int rank)
      : group_(std::move(group)), rank_(rank) {}
  // A closed rank never joins again: its peers must fail now, not at their timeout.
  ~InProcessCommunicator() override { abort("communicator closed"); }

  int world_size() const override { return group_->world_size(); }
  int rank() const override { return rank_; }
  std::chrono::milliseconds timeout() const override { return group_->timeout(); }

  std::unique_ptr<CollectiveWork> all_reduce_async(void* data, int64_t count, CommDType dtype,
                                                   ReduceOp op) override {
    check_size(Kind::kAllReduce, count);
    return issue(
        {.kind = Kind::kAllReduce, .data = data, .count = count, .dtype = dtype, .op = op});
  }

  std::unique_ptr<CollectiveWork> broadcast_async(void* data, int64_t bytes, int root) override {
    check_size(Kind::kBroadcast, bytes);
    if (root < 0 || root >= world_size()) {
      fail_here(Kind::kBroadcast, "root rank " + std::to_string(root) + " outside a world of " +
                                      std::to_string(world_size()));
    }
    return issue({.kind = Kind::kBroadcast, .data = data, .count = bytes, .root = root});
  }

  std::unique_ptr<CollectiveWork> all_gather_async(const void* send, void* recv,
                                                   int64_t bytes_per_rank) override {
    check_size(Kind::kAllGather, bytes_per_rank);
    return issue({.kind = Kind::kAllGather, .data = recv, .send = send, .count = bytes_per_rank});
  }

  void barrier() override { issue({.kind = Kind::kBarrier})->wait(); }

  void abort(const std::string& reason) override {
    group_->fail({rank_, "rank " + std::to_string(rank_) + " aborted: " + reason});
  }

 private:
  std::unique_ptr<CollectiveWork> issue(const Arrival& arrival) {
    const uint64_t sequence = next_sequence_++;
    const Clock::time_point deadline = deadline_after(group_->timeout());
    auto slot = group_->arrive(rank_, sequence, arrival);
    return std::make_unique<InProcessWork>(group_, std::move(slot), sequence, arrival.kind,
                                           deadline);
  }

  void check_size(Kind kind, int64_t size) {
    if (size < 0) fail_here(kind, "negative size " + std::to_string(size));
  }

  // An argument wrong on this rank alone: the peers will never see a matching call, so the group
  // breaks now, naming this rank.
  [[noreturn]] void fail_here(Kind kind, const std::string& detail) {
    group_->fail({rank_, "rank " + std::to_string(rank_) + ": " + detail});
    throw CommunicatorError(collective_kind_name(kind), rank_, detail);
  }

  std::shared_ptr<Group> group_;
  const int rank_;
  uint64_t next_sequence_ = 0;  // used by this rank's thread only
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_in_process_world(
    int world_size, std::chrono::milliseconds timeout) {
  if (world_size < 1) {
    throw std::invalid_argument("in-process world needs at least one rank, got " +
                                std::to_string(world_size));
  }
  auto group = std::make_shared<Group>(world_size, timeout);
  std::vector<std::unique_ptr<Communicator>> world;
  for (int r = 0; r < world_size; ++r) {
    world.push_back(std::make_unique<InProcessCommunicator>(group, r));
  }
  return world;
}

}  // namespace lomo
