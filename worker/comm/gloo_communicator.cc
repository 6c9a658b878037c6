#include "worker/comm/gloo_communicator.h"

#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>

#include <algorithm>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "worker/engine/memory.h"

namespace lomo {
namespace {

using Clock = std::chrono::steady_clock;
using gloo::transport::UnboundBuffer;

using Kind = CollectiveKind;

// What every Gloo wait is given. Our own deadline (the watchdog) always ends a wait first: Gloo's
// timeout would close every connection of the context, which peers cannot tell from a crash.
constexpr std::chrono::milliseconds kBackstop = std::chrono::hours(24 * 365);
// How long a closing rank waits for its notices to reach its peers.
constexpr std::chrono::milliseconds kNoticeFlush = std::chrono::seconds(2);
// Gloo does not wake a receive it was reading into, nor a send it was writing, when their
// connection breaks (tcp::Pair::signalException skips the in-flight unbound buffers), so a peer
// that dies mid-message would leave this rank waiting for the full timeout. Gloo does signal the
// receives still pending on a connection, so each peer gets a sentinel: a receive posted once on a
// slot nobody sends to. The watchdog checks the sentinels every kPeerCheckInterval. A broken
// connection is a dead peer once kCloseNoticeGrace has passed without that peer's close notice
// (which it sends before closing, but which our listener thread may not have handled yet). A dead
// peer is thus named within 2·kPeerCheckInterval + kCloseNoticeGrace (0.7 s) of its connection
// breaking, plus scheduling delays.
constexpr std::chrono::milliseconds kPeerCheckInterval{100};
constexpr std::chrono::milliseconds kCloseNoticeGrace{500};
// Slot of the sentinels: never sent to, so they stay pending for the connection's life.
constexpr uint64_t kSentinelSlot = (uint64_t{1} << 63) | 1;

// The first message of every collective, sent by every rank to every other.
struct Header {
  uint64_t sequence = 0;
  int64_t count = 0;
  int32_t root = 0;
  uint8_t kind = 0;
  uint8_t dtype = 0;
  uint8_t op = 0;
  uint8_t unused = 0;
};

enum class NoticeType : int32_t { kFailed = 1, kClosed = 2 };

// A control message: the group failed (naming the rank at fault), or a rank closed having
// finished `finished` collectives (its collectives from that sequence on will never run).
struct Notice {
  NoticeType type = NoticeType::kFailed;
  int32_t peer = -1;  // -1: unknown
  uint64_t finished = 0;
  char detail[240] = {};
};

// Slots keep the messages of different collectives and phases apart.
constexpr uint64_t kControlSlot = uint64_t{1} << 63;
enum Phase : uint64_t { kHandshake = 0, kData = 1, kGather = 2 };
uint64_t slot_of(uint64_t sequence, Phase phase, int step) {
  return (sequence << 24) | (static_cast<uint64_t>(phase) << 20) | static_cast<uint64_t>(step);
}

// Element-wise kernels of all_reduce. Integers wrap (two's complement) instead of overflowing.
template <typename T>
void add_arrays(void* out, const void* a, const void* b, size_t n) {
  auto* o = static_cast<T*>(out);
  const auto* x = static_cast<const T*>(a);
  const auto* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) {
    if constexpr (std::is_integral_v<T>) {
      o[i] = static_cast<T>(static_cast<uint64_t>(x[i]) + static_cast<uint64_t>(y[i]));
    } else {
      o[i] = x[i] + y[i];
    }
  }
}

template <typename T>
void divide_array(void* data, size_t n, int world_size) {
  auto* values = static_cast<T*>(data);
  const auto divisor = static_cast<T>(world_size);
  for (size_t i = 0; i < n; ++i) values[i] /= divisor;
}

void add(CommDType dtype, void* out, const void* a, const void* b, size_t n) {
  switch (dtype) {
    case CommDType::kF32:
      return add_arrays<float>(out, a, b, n);
    case CommDType::kF64:
      return add_arrays<double>(out, a, b, n);
    case CommDType::kI64:
      return add_arrays<int64_t>(out, a, b, n);
  }
}

void divide(CommDType dtype, void* data, size_t n, int world_size) {
  switch (dtype) {
    case CommDType::kF32:
      return divide_array<float>(data, n, world_size);
    case CommDType::kF64:
      return divide_array<double>(data, n, world_size);
    case CommDType::kI64:
      return divide_array<int64_t>(data, n, world_size);
  }
}

struct WorkState {
  std::mutex mutex;
  std::condition_variable done_changed;
  bool done = false;
  std::optional<CommunicatorError> error;

  void finish(std::optional<CommunicatorError> result) {
    std::lock_guard lock(mutex);
    error = std::move(result);
    done = true;
    done_changed.notify_all();
  }
};

class GlooWork final : public CollectiveWork {
 public:
  explicit GlooWork(std::shared_ptr<WorkState> state) : state_(std::move(state)) {}
  // The executor bounds every collective by the timeout, so this wait is bounded too.
  void wait() override {
    std::unique_lock lock(state_->mutex);
    state_->done_changed.wait(lock, [&] { return state_->done; });
    if (state_->error) throw *state_->error;
  }
  bool is_done() const override {
    std::lock_guard lock(state_->mutex);
    return state_->done;
  }

 private:
  std::shared_ptr<WorkState> state_;
};

struct Task {
  CollectiveCall call;
  uint64_t sequence = 0;
  std::shared_ptr<WorkState> state = nullptr;
};

// What broke the group: the rank at fault (when known) and why.
struct Failure {
  std::optional<int> peer;
  std::string detail;
};

}  // namespace

class GlooCommunicator::Impl {
 public:
  Impl(const GlooCommunicatorOptions& options, gloo::rendezvous::Store& store)
      : options_(options),
        broken_since_(static_cast<size_t>(options.world_size)),
        headers_(static_cast<size_t>(options.world_size)) {
    connect(store);
    post_sentinels();
    executor_ = std::thread([this] { execute_loop(); });
    watchdog_ = std::thread([this] { watch_loop(); });
    if (options_.world_size > 1) listener_ = std::thread([this] { listen_loop(); });
  }

  ~Impl() { close(); }

  const GlooCommunicatorOptions& options() const { return options_; }

  std::unique_ptr<CollectiveWork> issue(const CollectiveCall& call) {
    auto state = std::make_shared<WorkState>();
    std::lock_guard lock(mutex_);
    throw_if_failed_locked(call.kind);
    queue_.push_back({call, issued_++, state});
    changed_.notify_all();
    return std::make_unique<GlooWork>(std::move(state));
  }

  // An argument wrong on this rank alone: its peers will never see a matching call, so the group
  // breaks now, naming this rank.
  [[noreturn]] void fail_here(Kind kind, const std::string& detail) {
    record_and_notify({options_.rank, "rank " + std::to_string(options_.rank) + ": " + detail});
    throw CommunicatorError(collective_kind_name(kind), options_.rank, detail);
  }

  void abort(const std::string& reason) {
    record_and_notify(
        {options_.rank, "rank " + std::to_string(options_.rank) + " aborted: " + reason});
  }

 private:
  void connect(gloo::rendezvous::Store& store) {
    try {
      gloo::transport::tcp::attr attr;
      attr.hostname = options_.hostname;
      device_ = gloo::transport::tcp::CreateDevice(attr);
      context_ = std::make_shared<gloo::rendezvous::Context>(options_.rank, options_.world_size);
      context_->setTimeout(options_.rendezvous_timeout.count() > 0 ? options_.rendezvous_timeout
                                                                   : options_.timeout);
      gloo::rendezvous::PrefixStore prefixed(options_.prefix, store);
      context_->connectFullMesh(prefixed, device_);
      context_->setTimeout(options_.timeout);
    } catch (const std::exception& error) {
      throw CommunicatorError("rendezvous", std::nullopt,
                              "rank " + std::to_string(options_.rank) + " of " +
                                  std::to_string(options_.world_size) + " under '" +
                                  options_.prefix + "': " + error.what());
    }
  }

  // --- Failure state (guarded by mutex_) ---

  void throw_if_failed_locked(Kind kind) const {
    if (failure_) {
      throw CommunicatorError(collective_kind_name(kind), failure_->peer, failure_->detail);
    }
  }

  // Ends every wait of the running collective; Gloo keeps the abort until the next wait.
  void wake_locked() {
    for (UnboundBuffer* buffer : waiting_on_) {
      buffer->abortWaitRecv();
      buffer->abortWaitSend();
    }
    changed_.notify_all();
  }

  // Records the first failure and wakes everything; true if this one was the first.
  bool record_locked(Failure failure) {
    const bool first = !failure_;
    if (first) failure_ = std::move(failure);
    wake_locked();
    return first;
  }

  // A failure this rank detected: its peers learn of it from a notice.
  void record_and_notify(Failure failure) {
    Notice notice;
    notice.type = NoticeType::kFailed;
    notice.peer = failure.peer.value_or(-1);
    std::strncpy(notice.detail, failure.detail.c_str(), sizeof(notice.detail) - 1);
    {
      std::lock_guard lock(mutex_);
      if (!record_locked(std::move(failure))) return;
    }
    send_notice(notice);
  }

  // Sends notice to every peer without waiting: the sends complete when the peers' listeners take
  // them (or fail when a peer is gone); the destructor waits for them before closing.
  void send_notice(const Notice& notice) {
    std::lock_guard lock(notice_mutex_);
    auto memory = std::make_unique<Notice>(notice);
    auto buffer = context_->createUnboundBuffer(memory.get(), sizeof(Notice));
    int sent = 0;
    for (int peer = 0; peer < options_.world_size; ++peer) {
      if (peer == options_.rank) continue;
      try {
        buffer->send(peer, kControlSlot);
        ++sent;
      } catch (const gloo::Exception&) {
        // The connection to that peer is gone: it cannot be told, and will fail on its own.
      }
    }
    notices_.push_back({std::move(memory), std::move(buffer), sent});
  }

  // --- Executor: runs the queued collectives in issue order ---

  void execute_loop() {
    for (;;) {
      Task task;
      {
        std::unique_lock lock(mutex_);
        changed_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      std::optional<CommunicatorError> error;
      try {
        begin(task);
        run(task);
        end(/*failed=*/false);
        std::lock_guard lock(mutex_);
        ++finished_;
      } catch (const CommunicatorError& failure) {
        error = failure;
        end(/*failed=*/true);
      } catch (const std::exception& failure) {
        // A Gloo call that threw outside a wait (e.g. posting on a closed connection).
        record_and_notify({std::nullopt, std::string("transport error: ") + failure.what()});
        std::lock_guard lock(mutex_);
        error = CommunicatorError(collective_kind_name(task.call.kind), failure_->peer,
                                  failure_->detail);
        end_locked(/*failed=*/true);
      }
      task.state->finish(std::move(error));
    }
  }

  void begin(const Task& task) {
    std::lock_guard lock(mutex_);
    if (task.sequence >= closed_from_) record_locked(closed_failure_locked());
    throw_if_failed_locked(task.call.kind);
    running_ = task.sequence;
    deadline_ = Clock::now() + std::min<Clock::duration>(options_.timeout, kBackstop);
    timed_out_ = false;
    changed_.notify_all();
  }

  void end(bool failed) {
    std::lock_guard lock(mutex_);
    end_locked(failed);
  }

  // After a failure Gloo may still complete a posted receive later: the buffers (and the scratch
  // memory they point into) are kept until the connections are closed.
  void end_locked(bool failed) {
    running_.reset();
    changed_.notify_all();  // close() waits for the running collective to end
    waiting_on_.clear();
    if (failed) {
      for (auto& buffer : buffers_) retained_.push_back(std::move(buffer));
    }
    buffers_.clear();
  }

  Failure closed_failure_locked() const {
    return {closed_peer_, "rank " + std::to_string(closed_peer_) +
                              " closed its communicator after finishing " +
                              std::to_string(closed_from_) + " collectives"};
  }

  UnboundBuffer* make_buffer(void* memory, size_t bytes) {
    auto buffer = context_->createUnboundBuffer(memory, bytes);
    UnboundBuffer* raw = buffer.get();
    std::lock_guard lock(mutex_);
    buffers_.push_back(std::move(buffer));
    waiting_on_.push_back(raw);
    // A wake that came between begin() and now found no buffer to end: end this one's waits now.
    if (failure_ || timed_out_ || (running_ && *running_ >= closed_from_)) {
      raw->abortWaitRecv();
      raw->abortWaitSend();
    }
    return raw;
  }

  // Posts buffer's receive from (or send to) `peer`; a connection already closed names the peer.
  void post(UnboundBuffer* buffer, bool receive, int peer, uint64_t slot, Kind kind) {
    try {
      if (receive) {
        buffer->recv(peer, slot);
      } else {
        buffer->send(peer, slot);
      }
    } catch (const gloo::Exception& error) {
      fail_detected(
          kind, {peer, "connection to rank " + std::to_string(peer) + " failed: " + error.what()});
    }
  }

  // Waits for buffer's receive (or send) with `peer`; throws CommunicatorError naming the peer on
  // a timeout or a broken connection, or the group's failure when woken by one.
  void await(UnboundBuffer* buffer, bool receive, int peer, Kind kind, const char* missing) {
    bool completed = false;
    try {
      completed =
          receive ? buffer->waitRecv(nullptr, kBackstop) : buffer->waitSend(nullptr, kBackstop);
    } catch (const gloo::Exception& error) {
      fail_detected(
          kind, {peer, "connection to rank " + std::to_string(peer) + " failed: " + error.what()});
    }
    if (completed) return;
    std::unique_lock lock(mutex_);
    if (!failure_ && running_ && *running_ >= closed_from_) record_locked(closed_failure_locked());
    throw_if_failed_locked(kind);
    lock.unlock();
    // Woken without a failure: the deadline passed.
    fail_detected(kind, {peer, "rank " + std::to_string(peer) + " did not " + missing + " " +
                                   collective_kind_name(kind) + " #" + std::to_string(*running_) +
                                   " within " + std::to_string(options_.timeout.count()) + " ms"});
  }

  // Throws the group's first failure: this one, or one that came a moment earlier.
  [[noreturn]] void fail_detected(Kind kind, Failure failure) {
    record_and_notify(std::move(failure));
    std::lock_guard lock(mutex_);
    throw CommunicatorError(collective_kind_name(kind), failure_->peer, failure_->detail);
  }

  void run(const Task& task) {
    handshake(task);
    if (task.call.count == 0)
      return;  // an empty collective moves nothing (its buffers may be null)
    switch (task.call.kind) {
      case Kind::kAllReduce:
        return ring_all_reduce(task);
      case Kind::kBroadcast:
        return broadcast(task);
      case Kind::kAllGather:
        return all_gather(task);
      case Kind::kBarrier:
        return;
    }
  }

  // Every rank sends its header to every other and waits for all of theirs: a rank past this
  // point knows that every rank issued this collective (so it is also the barrier), and that they
  // agree on what it is.
  void handshake(const Task& task) {
    const int n = options_.world_size;
    const int me = options_.rank;
    Header& mine = headers_[static_cast<size_t>(me)];
    mine = {.sequence = task.sequence,
            .count = task.call.count,
            .root = task.call.root,
            .kind = static_cast<uint8_t>(task.call.kind),
            .dtype = static_cast<uint8_t>(task.call.dtype),
            .op = static_cast<uint8_t>(task.call.op)};
    if (n == 1) return;
    const uint64_t slot = slot_of(task.sequence, kHandshake, 0);
    std::vector<UnboundBuffer*> receives(static_cast<size_t>(n), nullptr);
    std::vector<UnboundBuffer*> sends(static_cast<size_t>(n), nullptr);
    for (int peer = 0; peer < n; ++peer) {
      if (peer == me) continue;
      receives[peer] = make_buffer(&headers_[static_cast<size_t>(peer)], sizeof(Header));
      post(receives[peer], true, peer, slot, task.call.kind);
    }
    header_out_ = mine;
    for (int peer = 0; peer < n; ++peer) {
      if (peer == me) continue;
      sends[peer] = make_buffer(&header_out_, sizeof(Header));
      post(sends[peer], false, peer, slot, task.call.kind);
    }
    // In rank order, so a timeout names the lowest rank that did not join.
    for (int peer = 0; peer < n; ++peer) {
      if (peer != me) await(receives[peer], true, peer, task.call.kind, "join");
    }
    for (int peer = 0; peer < n; ++peer) {
      if (peer != me) await(sends[peer], false, peer, task.call.kind, "accept the header of");
    }
    check_agreement(task.call.kind);
  }

  // Every rank compares every header with rank 0's, so all name the same first disagreeing rank.
  void check_agreement(Kind kind) {
    const Header& first = headers_[0];
    for (int r = 1; r < options_.world_size; ++r) {
      const Header& other = headers_[static_cast<size_t>(r)];
      std::string what;
      if (other.kind != first.kind) {
        what = std::string("issued ") + collective_kind_name(static_cast<Kind>(other.kind)) +
               " where rank 0 issued " + collective_kind_name(static_cast<Kind>(first.kind));
      } else if (other.count != first.count) {
        what = "gave count " + std::to_string(other.count) + " where rank 0 gave " +
               std::to_string(first.count);
      } else if (first.kind == static_cast<uint8_t>(Kind::kAllReduce) &&
                 other.dtype != first.dtype) {
        what = "gave dtype " + std::string(comm_dtype_name(static_cast<CommDType>(other.dtype))) +
               " where rank 0 gave " +
               std::string(comm_dtype_name(static_cast<CommDType>(first.dtype)));
      } else if (first.kind == static_cast<uint8_t>(Kind::kAllReduce) && other.op != first.op) {
        what = "gave a different reduce op than rank 0";
      } else if (first.kind == static_cast<uint8_t>(Kind::kBroadcast) && other.root != first.root) {
        what = "gave root " + std::to_string(other.root) + " where rank 0 gave " +
               std::to_string(first.root);
      }
      if (!what.empty()) fail_detected(kind, {r, "rank " + std::to_string(r) + " " + what});
    }
  }

  // Sends `send_bytes` of `send` to `to` while receiving `recv_bytes` into `recv` from `from`.
  void exchange(void* send, size_t send_bytes, int to, void* recv, size_t recv_bytes, int from,
                uint64_t slot, Kind kind) {
    UnboundBuffer* receiving = nullptr;
    UnboundBuffer* sending = nullptr;
    if (recv_bytes > 0) {
      receiving = make_buffer(recv, recv_bytes);
      post(receiving, true, from, slot, kind);
    }
    if (send_bytes > 0) {
      sending = make_buffer(send, send_bytes);
      post(sending, false, to, slot, kind);
    }
    if (receiving) await(receiving, true, from, kind, "send its part of");
    if (sending) await(sending, false, to, kind, "take its part of");
  }

  char* scratch(int which, size_t bytes) {
    Staging& staging = scratch_[which];
    if (staging.bytes < bytes) {
      // Freed before the larger one is made: the peak is the larger one alone.
      staging.memory.reset();
      count_staging(-static_cast<int64_t>(staging.bytes));
      staging.bytes = 0;
      staging.memory = std::make_unique_for_overwrite<char[]>(bytes);
      staging.bytes = bytes;
      count_staging(static_cast<int64_t>(bytes));
    }
    return staging.memory.get();
  }

  // Staging bytes grew (or shrank) by `delta`: the accountant, when there is one, hears of it.
  void count_staging(int64_t delta) {
    std::lock_guard lock(staging_mutex_);
    staging_bytes_ = static_cast<uint64_t>(static_cast<int64_t>(staging_bytes_) + delta);
    if (staging_accountant_ == nullptr || delta == 0) return;
    if (delta > 0) {
      staging_accountant_->record_allocation(MemoryKind::kCommunication,
                                             static_cast<uint64_t>(delta));
    } else {
      staging_accountant_->record_release(MemoryKind::kCommunication,
                                          static_cast<uint64_t>(-delta));
    }
  }

 public:
  void set_buffer_accountant(MemoryAccountant* accountant) {
    std::lock_guard lock(staging_mutex_);
    if (accountant == staging_accountant_) return;
    if (staging_accountant_ != nullptr && staging_bytes_ > 0) {
      staging_accountant_->record_release(MemoryKind::kCommunication, staging_bytes_);
    }
    staging_accountant_ = accountant;
    if (staging_accountant_ != nullptr && staging_bytes_ > 0) {
      staging_accountant_->record_allocation(MemoryKind::kCommunication, staging_bytes_);
    }
  }

 private:
  // Ring reduce-scatter, then ring all-gather. Chunk c starts at rank c and is summed by each next
  // rank in turn (partial + own); the rank that adds the last part owns the total, divides it for
  // a mean, and the all-gather only copies it. One chain of additions per chunk: the same bits on
  // every rank. Traffic per rank: 2·(n−1)/n of the buffer, the ring bound.
  void ring_all_reduce(const Task& task) {
    const int n = options_.world_size;
    const int me = options_.rank;
    const size_t element = comm_dtype_size(task.call.dtype);
    const auto count = static_cast<size_t>(task.call.count);
    if (n == 1) return;  // the sum (and mean) over one rank is the value itself
    const size_t base = count / static_cast<size_t>(n);
    const size_t extra = count % static_cast<size_t>(n);
    auto begin_of = [&](int c) { return c * base + std::min<size_t>(c, extra); };
    auto length_of = [&](int c) { return base + (static_cast<size_t>(c) < extra ? 1 : 0); };
    auto wrap = [&](int c) { return ((c % n) + n) % n; };
    char* data = static_cast<char*>(task.call.data);
    const size_t largest = (base + (extra ? 1 : 0)) * element;
    char* outgoing = scratch(0, largest);
    char* incoming = scratch(1, largest);
    const int right = wrap(me + 1);
    const int left = wrap(me - 1);

    std::memcpy(outgoing, data + begin_of(me) * element, length_of(me) * element);
    for (int step = 0; step < n - 1; ++step) {
      const int sent = wrap(me - step);
      const int received = wrap(me - step - 1);
      exchange(outgoing, length_of(sent) * element, right, incoming, length_of(received) * element,
               left, slot_of(task.sequence, kData, step), task.call.kind);
      add(task.call.dtype, outgoing, incoming, data + begin_of(received) * element,
          length_of(received));
    }
    const int owned = wrap(me + 1);
    if (task.call.op == ReduceOp::kMean) divide(task.call.dtype, outgoing, length_of(owned), n);
    std::memcpy(data + begin_of(owned) * element, outgoing, length_of(owned) * element);

    for (int step = 0; step < n - 1; ++step) {
      const int sent = wrap(me + 1 - step);
      const int received = wrap(me - step);
      exchange(outgoing, length_of(sent) * element, right, incoming, length_of(received) * element,
               left, slot_of(task.sequence, kGather, step), task.call.kind);
      std::memcpy(data + begin_of(received) * element, incoming, length_of(received) * element);
      std::swap(outgoing, incoming);
    }
  }

  // The root sends to every rank directly.
  void broadcast(const Task& task) {
    const auto bytes = static_cast<size_t>(task.call.count);
    const uint64_t slot = slot_of(task.sequence, kData, 0);
    if (options_.rank != task.call.root) {
      char* incoming = scratch(1, bytes);
      UnboundBuffer* receiving = make_buffer(incoming, bytes);
      post(receiving, true, task.call.root, slot, task.call.kind);
      await(receiving, true, task.call.root, task.call.kind, "send");
      std::memcpy(task.call.data, incoming, bytes);
      return;
    }
    char* outgoing = scratch(0, bytes);
    std::memcpy(outgoing, task.call.data, bytes);
    std::vector<std::pair<int, UnboundBuffer*>> sends;
    for (int peer = 0; peer < options_.world_size; ++peer) {
      if (peer == task.call.root) continue;
      sends.emplace_back(peer, make_buffer(outgoing, bytes));
      post(sends.back().second, false, peer, slot, task.call.kind);
    }
    for (auto& [peer, sending] : sends) await(sending, false, peer, task.call.kind, "take");
  }

  // Every rank sends its part to every other (small values).
  void all_gather(const Task& task) {
    const int n = options_.world_size;
    const int me = options_.rank;
    const auto bytes = static_cast<size_t>(task.call.count);
    const uint64_t slot = slot_of(task.sequence, kData, 0);
    char* gathered = scratch(0, bytes * static_cast<size_t>(n));
    std::memcpy(gathered + static_cast<size_t>(me) * bytes, task.call.send, bytes);
    std::vector<std::pair<int, UnboundBuffer*>> receives, sends;
    for (int peer = 0; peer < n; ++peer) {
      if (peer == me) continue;
      receives.emplace_back(peer, make_buffer(gathered + static_cast<size_t>(peer) * bytes, bytes));
      post(receives.back().second, true, peer, slot, task.call.kind);
    }
    for (int peer = 0; peer < n; ++peer) {
      if (peer == me) continue;
      sends.emplace_back(peer, make_buffer(gathered + static_cast<size_t>(me) * bytes, bytes));
      post(sends.back().second, false, peer, slot, task.call.kind);
    }
    for (auto& [peer, receiving] : receives)
      await(receiving, true, peer, task.call.kind, "send its part of");
    for (auto& [peer, sending] : sends)
      await(sending, false, peer, task.call.kind, "take its part of");
    std::memcpy(task.call.data, gathered, bytes * static_cast<size_t>(n));
  }

  // --- Watchdog: ends the running collective's waits at its deadline, and finds dead peers ---

  void watch_loop() {
    std::unique_lock lock(mutex_);
    auto next_check = Clock::now() + kPeerCheckInterval;
    while (!stopping_) {
      const auto now = Clock::now();
      if (running_ && !timed_out_ && now >= deadline_) {
        timed_out_ = true;
        wake_locked();
      } else if (options_.world_size > 1 && now >= next_check) {
        lock.unlock();
        check_peers();
        lock.lock();
        next_check = Clock::now() + kPeerCheckInterval;
      } else {
        auto until = options_.world_size > 1 ? next_check : Clock::time_point::max();
        if (running_ && !timed_out_) until = std::min(until, deadline_);
        changed_.wait_until(lock, until);
      }
    }
  }

  // Fails the group naming the first peer whose connection has been broken for kCloseNoticeGrace
  // without a close notice from it.
  void check_peers() {
    for (int peer = 0; peer < options_.world_size; ++peer) {
      if (peer == options_.rank) continue;
      const std::optional<std::string> broken = probe(peer);
      std::unique_lock lock(mutex_);
      if (!broken || failure_ || stopping_ || closed_peers_.count(peer) > 0) continue;
      auto& since = broken_since_[static_cast<size_t>(peer)];
      if (!since) since = Clock::now();
      if (Clock::now() - *since < kCloseNoticeGrace) continue;
      lock.unlock();
      record_and_notify(
          {peer, "connection to rank " + std::to_string(peer) + " failed: " + *broken});
      return;
    }
  }

  // Posts the sentinels; a connection already broken shows at the first check.
  void post_sentinels() {
    sentinels_.resize(static_cast<size_t>(options_.world_size));
    for (int peer = 0; peer < options_.world_size; ++peer) {
      if (peer == options_.rank) continue;
      Sentinel& sentinel = sentinels_[static_cast<size_t>(peer)];
      sentinel.buffer = context_->createUnboundBuffer(nullptr, 0);
      try {
        sentinel.buffer->recv(peer, kSentinelSlot);
      } catch (const gloo::Exception& error) {
        sentinel.broken = error.what();
      }
    }
  }

  // The error of peer's connection, if it broke. Aborting the sentinel's wait first makes the
  // wait return at once: it throws if Gloo signalled the connection's error, else returns false.
  std::optional<std::string> probe(int peer) {
    Sentinel& sentinel = sentinels_[static_cast<size_t>(peer)];
    if (sentinel.broken) return sentinel.broken;
    try {
      sentinel.buffer->abortWaitRecv();
      sentinel.buffer->waitRecv(nullptr, kBackstop);
    } catch (const gloo::Exception& error) {
      return std::string(error.what());
    }
    return std::nullopt;
  }

  // --- Listener: receives the peers' notices ---

  struct Listening {
    Notice notice;
    std::unique_ptr<UnboundBuffer> buffer;
  };

  void listen_loop() {
    std::vector<int> sources;
    for (int peer = 0; peer < options_.world_size; ++peer) {
      if (peer != options_.rank) sources.push_back(peer);
    }
    while (!sources.empty()) {
      auto listening = std::make_unique<Listening>();
      listening->buffer = context_->createUnboundBuffer(&listening->notice, sizeof(Notice));
      Listening* current = listening.get();
      {
        std::lock_guard lock(mutex_);
        if (stopping_) return;
        listening_.push_back(std::move(listening));  // kept: Gloo may still write into it
      }
      bool received = false;
      try {
        current->buffer->recv(sources, kControlSlot);
        received = current->buffer->waitRecv(nullptr, kBackstop);
      } catch (const gloo::Exception& error) {
        // A connection closed. Expected from a peer that sent its close notice: listen on to the
        // others. Otherwise a peer crashed; which one, Gloo does not say.
        std::lock_guard lock(mutex_);
        if (stopping_) return;
        const auto before = sources.size();
        std::erase_if(sources, [&](int peer) { return closed_peers_.count(peer) > 0; });
        if (sources.size() < before) continue;
        // With one peer left to listen to, the lost connection was to that peer.
        const std::optional<int> lost =
            sources.size() == 1 ? std::optional<int>(sources[0]) : std::nullopt;
        record_locked({lost, std::string("lost the connection to a peer: ") + error.what()});
        return;
      }
      if (!received) return;  // woken to stop
      handle(current->notice);
    }
  }

  void handle(const Notice& notice) {
    std::lock_guard lock(mutex_);
    const std::optional<int> peer =
        notice.peer >= 0 ? std::optional<int>(notice.peer) : std::nullopt;
    const std::string detail(notice.detail, strnlen(notice.detail, sizeof(notice.detail)));
    if (notice.type == NoticeType::kFailed) {
      record_locked({peer, detail});
      return;
    }
    closed_peers_.insert(notice.peer);
    if (notice.finished < closed_from_) {
      closed_from_ = notice.finished;
      closed_peer_ = notice.peer;
    }
    if (running_ && *running_ >= closed_from_) wake_locked();
  }

  // --- Closing ---

  void close() {
    uint64_t finished = 0;
    {
      std::unique_lock lock(mutex_);
      // Collectives still queued on this rank can no longer run, and the running one is woken.
      record_locked(
          {options_.rank, "rank " + std::to_string(options_.rank) + " closed its communicator"});
      // Once the running collective has ended, every later one fails in begin(): the peers learn
      // the first collective this rank did not finish, not merely how many it issued (a peer
      // waiting in one of those would otherwise never be woken by the notice).
      changed_.wait(lock, [&] { return !running_; });
      finished = finished_;
    }
    if (options_.world_size > 1) {
      Notice notice;
      notice.type = NoticeType::kClosed;
      notice.peer = options_.rank;
      notice.finished = finished;
      send_notice(notice);
      flush_notices();
    }
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      for (auto& listening : listening_) listening->buffer->abortWaitRecv();
      changed_.notify_all();
    }
    executor_.join();
    watchdog_.join();
    if (listener_.joinable()) listener_.join();
    // Buffers hold the transport context; the connections close when the last of them is gone.
    buffers_.clear();
    retained_.clear();
    sentinels_.clear();
    listening_.clear();
    notices_.clear();
    context_.reset();
    device_.reset();
    set_buffer_accountant(nullptr);
  }

  // Waits (bounded) until the peers took this rank's notices, so they arrive before the close.
  void flush_notices() {
    const auto deadline = Clock::now() + std::min(kNoticeFlush, options_.timeout);
    std::lock_guard lock(notice_mutex_);
    for (auto& notice : notices_) {
      try {
        for (int i = 0; i < notice.sends; ++i) {
          const auto left =
              std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
          if (left.count() <= 0 || !notice.buffer->waitSend(nullptr, left)) return;
        }
      } catch (const gloo::Exception&) {
        // That peer is gone already (or the flush timed out): nothing more to tell it.
      }
    }
  }

  struct SentNotice {
    std::unique_ptr<Notice> memory;
    std::unique_ptr<UnboundBuffer> buffer;
    int sends = 0;
  };

  const GlooCommunicatorOptions options_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::rendezvous::Context> context_;

  std::mutex mutex_;  // guards the members up to the executor's own
  std::condition_variable changed_;
  std::optional<Failure> failure_;
  uint64_t closed_from_ = std::numeric_limits<uint64_t>::max();  // a peer closed after this many
  int closed_peer_ = -1;
  std::set<int> closed_peers_;
  std::deque<Task> queue_;
  uint64_t issued_ = 0;
  uint64_t finished_ = 0;  // collectives completed (in issue order, so the next one is unfinished)
  std::vector<std::optional<Clock::time_point>> broken_since_;  // per peer, by the watchdog
  struct Sentinel {
    std::unique_ptr<UnboundBuffer> buffer;
    std::optional<std::string> broken;  // the error of posting it
  };
  std::vector<Sentinel> sentinels_;  // per peer; set before the threads start
  bool stopping_ = false;
  std::optional<uint64_t> running_;  // sequence of the collective the executor runs
  Clock::time_point deadline_;
  bool timed_out_ = false;
  std::vector<UnboundBuffer*> waiting_on_;  // the running collective's buffers
  std::vector<std::unique_ptr<UnboundBuffer>> buffers_;
  std::vector<std::unique_ptr<UnboundBuffer>> retained_;  // of failed collectives
  std::vector<std::unique_ptr<Listening>> listening_;

  std::mutex notice_mutex_;
  std::vector<SentNotice> notices_;

  // The executor's own.
  std::vector<Header> headers_;
  Header header_out_;
  struct Staging {
    std::unique_ptr<char[]> memory;
    size_t bytes = 0;
  };
  Staging scratch_[2];

  std::mutex staging_mutex_;  // guards the two below; the executor grows, any thread moves them
  MemoryAccountant* staging_accountant_ = nullptr;
  uint64_t staging_bytes_ = 0;  // scratch_'s bytes, counted against staging_accountant_

  std::thread executor_;
  std::thread watchdog_;
  std::thread listener_;
};

GlooCommunicator::GlooCommunicator(const GlooCommunicatorOptions& options,
                                   gloo::rendezvous::Store& store) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    throw std::invalid_argument("rank " + std::to_string(options.rank) + " outside a world of " +
                                std::to_string(options.world_size));
  }
  // Gloo's TCP transport writes to its sockets without MSG_NOSIGNAL: a peer that died would end
  // this whole process with SIGPIPE before the write could fail and become a CommunicatorError
  // naming that peer. Ignoring SIGPIPE is process-wide; every lomo program that communicates
  // wants it (the worker daemon does the same for gRPC).
  std::signal(SIGPIPE, SIG_IGN);
  impl_ = std::make_unique<Impl>(options, store);
}

GlooCommunicator::~GlooCommunicator() = default;

int GlooCommunicator::world_size() const { return impl_->options().world_size; }
int GlooCommunicator::rank() const { return impl_->options().rank; }
std::chrono::milliseconds GlooCommunicator::timeout() const { return impl_->options().timeout; }

std::unique_ptr<CollectiveWork> GlooCommunicator::all_reduce_async(void* data, int64_t count,
                                                                   CommDType dtype, ReduceOp op) {
  if (count < 0) impl_->fail_here(Kind::kAllReduce, "negative size " + std::to_string(count));
  return impl_->issue(
      {.kind = Kind::kAllReduce, .data = data, .count = count, .dtype = dtype, .op = op});
}

std::unique_ptr<CollectiveWork> GlooCommunicator::broadcast_async(void* data, int64_t bytes,
                                                                  int root) {
  if (bytes < 0) impl_->fail_here(Kind::kBroadcast, "negative size " + std::to_string(bytes));
  if (root < 0 || root >= world_size()) {
    impl_->fail_here(Kind::kBroadcast, "root rank " + std::to_string(root) +
                                           " outside a world of " + std::to_string(world_size()));
  }
  return impl_->issue({.kind = Kind::kBroadcast, .data = data, .count = bytes, .root = root});
}

std::unique_ptr<CollectiveWork> GlooCommunicator::all_gather_async(const void* send, void* recv,
                                                                   int64_t bytes_per_rank) {
  if (bytes_per_rank < 0) {
    impl_->fail_here(Kind::kAllGather, "negative size " + std::to_string(bytes_per_rank));
  }
  return impl_->issue(
      {.kind = Kind::kAllGather, .data = recv, .send = send, .count = bytes_per_rank});
}

void GlooCommunicator::barrier() { impl_->issue({.kind = Kind::kBarrier})->wait(); }

void GlooCommunicator::abort(const std::string& reason) { impl_->abort(reason); }

void GlooCommunicator::set_buffer_accountant(MemoryAccountant* accountant) {
  impl_->set_buffer_accountant(accountant);
}

}  // namespace lomo
