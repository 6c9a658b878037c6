#include "worker/comm/nccl_communicator.h"

#include <nccl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>

#include "worker/comm/nccl_mean.h"

namespace lomo {

static_assert(kNcclUniqueIdBytes == NCCL_UNIQUE_ID_BYTES);

namespace {

using Clock = std::chrono::steady_clock;
using Kind = CollectiveKind;

// Polling first yields (a short collective is seen complete within microseconds), then sleeps
// ever longer up to kMaxSleep (a long wait costs little CPU, and a timeout is seen within it).
class Backoff {
 public:
  void pause() {
    if (Clock::now() - start_ < kSpinFor) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(sleep_);
    sleep_ = std::min(sleep_ * 2, kMaxSleep);
  }

 private:
  static constexpr std::chrono::microseconds kSpinFor{200};
  static constexpr std::chrono::microseconds kMaxSleep{1000};
  Clock::time_point start_ = Clock::now();
  std::chrono::microseconds sleep_{20};
};

std::string cuda_text(cudaError_t status) {
  return std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")";
}

std::string nccl_text(ncclResult_t result) {
  std::string text = ncclGetErrorString(result);
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && last[0] != '\0') text += std::string(": ") + last;
  return text;
}

// Every thread that calls in (a watchdog's abort(), a work waited on elsewhere) may have another
// device current; CUDA and NCCL calls here need the communicator's.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ == device) return;
    status_ = cudaSetDevice(device);
    switched_ = status_ == cudaSuccess && previous_ >= 0;
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  cudaError_t status_ = cudaSuccess;
  bool switched_ = false;
};

ncclDataType_t nccl_type(CommDType dtype) {
  switch (dtype) {
    case CommDType::kF32:
      return ncclFloat32;
    case CommDType::kF64:
      return ncclFloat64;
    case CommDType::kI64:
      return ncclInt64;
  }
  throw std::invalid_argument("unknown communicator dtype");
}

nccl_mean::Element mean_element(CommDType dtype) {
  switch (dtype) {
    case CommDType::kF32:
      return nccl_mean::Element::kF32;
    case CommDType::kF64:
      return nccl_mean::Element::kF64;
    case CommDType::kI64:
      return nccl_mean::Element::kI64;
  }
  throw std::invalid_argument("unknown communicator dtype");
}

// Why `pointer` cannot be a collective's buffer on `device`, if it cannot.
std::optional<std::string> device_memory_problem(const void* pointer, int device) {
  if (pointer == nullptr) return "a null pointer";
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, pointer);
  if (status != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so that later calls do not report it
    return "a pointer CUDA cannot place: " + cuda_text(status);
  }
  if (attributes.type == cudaMemoryTypeManaged) return std::nullopt;
  if (attributes.type != cudaMemoryTypeDevice) return "host memory, not device memory";
  if (attributes.device != device) {
    return "memory of CUDA device " + std::to_string(attributes.device) +
           ", not of this communicator's device " + std::to_string(device);
  }
  return std::nullopt;
}

// What broke the communicator: the rank at fault (when known) and why.
struct Failure {
  std::optional<int> peer;
  std::string detail;
};

enum class Outcome : uint8_t { kPending, kDone, kFailed };

// One issued collective.
struct Record {
  Kind kind = Kind::kBarrier;
  cudaEvent_t event = nullptr;  // recorded after the collective; null when nothing was enqueued
  Clock::time_point deadline;
  Outcome outcome = Outcome::kPending;
  std::optional<CommunicatorError> error;  // when kFailed

  Record() = default;
  Record(const Record&) = delete;
  Record& operator=(const Record&) = delete;
  ~Record() {
    if (event != nullptr) cudaEventDestroy(event);  // released by CUDA once it has completed
  }
};

// What the communicator and its works share: works may outlive the communicator.
struct State {
  NcclCommunicatorOptions options;
  std::mutex mutex;           // guards the members below, and serialises every call on `comm`
  ncclComm_t comm = nullptr;  // null once destroyed or aborted
  std::optional<Failure> failure;
  // Issued, not yet settled, in issue order. A record is kPending exactly while it is here.
  std::deque<std::shared_ptr<Record>> pending;

  std::string who() const { return "rank " + std::to_string(options.rank); }

  CommunicatorError error_locked(Kind kind) const {
    return CommunicatorError(collective_kind_name(kind), failure->peer, failure->detail);
  }

  void throw_if_failed_locked(Kind kind) const {
    if (failure) throw error_locked(kind);
  }

  void settle_locked(Record& record, Outcome outcome) {
    record.outcome = outcome;
    if (outcome == Outcome::kFailed) record.error = error_locked(record.kind);
    std::erase_if(pending,
                  [&](const std::shared_ptr<Record>& each) { return each.get() == &record; });
  }

  // Settles the records that completed, oldest first (they complete in issue order), so that
  // works dropped without a wait do not pile up here.
  void settle_completed_locked() {
    while (!pending.empty() && cudaEventQuery(pending.front()->event) == cudaSuccess) {
      pending.front()->outcome = Outcome::kDone;
      pending.pop_front();
    }
  }

  // Records the first failure: works that completed before it keep their results, the others
  // fail with it, and the NCCL communicator is aborted, which also ends its running kernels.
  void fail_locked(Failure first) {
    if (failure) return;
    failure = std::move(first);
    for (const auto& record : pending) {
      record->outcome =
          cudaEventQuery(record->event) == cudaSuccess ? Outcome::kDone : Outcome::kFailed;
      if (record->outcome == Outcome::kFailed) record->error = error_locked(record->kind);
    }
    pending.clear();
    cudaGetLastError();  // a failed query above must not be reported by a later, unrelated call
    if (comm != nullptr) {
      ncclCommAbort(comm);  // its result changes nothing: the communicator is gone either way
      comm = nullptr;
    }
  }

  Failure timed_out(Kind kind) const {
    return {std::nullopt, who() + ": " + collective_kind_name(kind) + " did not complete within " +
                              std::to_string(options.timeout.count()) +
                              " ms (a peer did not join it, or is stuck or gone); the NCCL "
                              "communicator was aborted"};
  }

  Failure nccl_failed(ncclResult_t result) const {
    std::string detail = who() + ": NCCL reported " + nccl_text(result);
    if (result == ncclRemoteError) detail += " (a peer failed or closed its connection)";
    return {std::nullopt, detail + "; the NCCL communicator was aborted"};
  }

  // NCCL's asynchronous state: ncclSuccess, ncclInProgress or an error.
  ncclResult_t async_state_locked() const {
    if (comm == nullptr) return ncclInvalidUsage;  // not reached: a failure is recorded first
    ncclResult_t state = ncclSuccess;
    const ncclResult_t result = ncclCommGetAsyncError(comm, &state);
    return result == ncclSuccess ? state : result;
  }

  // Settles `record` if it completed, failed, or passed its deadline; never blocks.
  void poll_locked(Record& record) {
    if (record.outcome != Outcome::kPending) return;
    const cudaError_t status = cudaEventQuery(record.event);
    if (status == cudaSuccess) {
      settle_locked(record, Outcome::kDone);
    } else if (status != cudaErrorNotReady) {
      fail_locked({std::nullopt, who() + ": CUDA failed while " +
                                     collective_kind_name(record.kind) +
                                     " ran: " + cuda_text(status)});
    } else if (const ncclResult_t state = async_state_locked();
               state != ncclSuccess && state != ncclInProgress) {
      fail_locked(nccl_failed(state));
    } else if (Clock::now() >= record.deadline) {
      fail_locked(timed_out(record.kind));
    }
  }
};

class NcclWork final : public CollectiveWork {
 public:
  NcclWork(std::shared_ptr<State> state, std::shared_ptr<Record> record)
      : state_(std::move(state)), record_(std::move(record)) {}

  // Bounded: poll_locked fails the record at its deadline.
  void wait() override {
    DeviceScope scope(state_->options.device);
    Backoff backoff;
    for (;;) {
      {
        std::lock_guard lock(state_->mutex);
        state_->poll_locked(*record_);
        if (record_->outcome == Outcome::kDone) return;
        if (record_->outcome == Outcome::kFailed) throw *record_->error;
      }
      backoff.pause();
    }
  }

  bool is_done() const override {
    DeviceScope scope(state_->options.device);
    std::lock_guard lock(state_->mutex);
    state_->poll_locked(*record_);
    return record_->outcome != Outcome::kPending;
  }

 private:
  std::shared_ptr<State> state_;
  std::shared_ptr<Record> record_;
};

// The bytes a call moves on this rank; zero means there is nothing to enqueue.
int64_t payload_of(const CollectiveCall& call) {
  return call.kind == Kind::kAllReduce
             ? call.count * static_cast<int64_t>(comm_dtype_size(call.dtype))
             : call.count;
}

}  // namespace

std::string nccl_unique_id() {
  ncclUniqueId id;
  const ncclResult_t result = ncclGetUniqueId(&id);
  if (result != ncclSuccess) {
    throw CommunicatorError("rendezvous", std::nullopt,
                            "NCCL could not make a unique id: " + nccl_text(result));
  }
  return std::string(id.internal, sizeof(id.internal));
}

class NcclCommunicator::Impl {
 public:
  Impl(const NcclCommunicatorOptions& options, const std::string& unique_id)
      : state_(std::make_shared<State>()) {
    state_->options = options;
    DeviceScope scope(options.device);
    try {
      check_cuda(scope.status(), "select the device");
      check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "create a stream");
      check_cuda(cudaEventCreateWithFlags(&input_ready_, cudaEventDisableTiming),
                 "create an event");
      // Stream-ordered, so that neither this nor its release waits for the whole device.
      check_cuda(cudaMallocAsync(&barrier_value_, sizeof(float), stream_),
                 "allocate the barrier's value");
      check_cuda(cudaMemsetAsync(barrier_value_, 0, sizeof(float), stream_),
                 "clear the barrier's value");
      state_->comm = init_nccl(unique_id);
    } catch (...) {
      release_cuda();
      throw;
    }
  }

  ~Impl() { close(); }

  const NcclCommunicatorOptions& options() const { return state_->options; }
  cudaStream_t stream() const { return stream_; }
  void* barrier_value() const { return barrier_value_; }

  void set_input_stream(cudaStream_t stream) {
    std::lock_guard issue_lock(issue_mutex_);
    input_stream_ = stream;
  }

  std::unique_ptr<CollectiveWork> issue(const CollectiveCall& call) {
    std::lock_guard issue_lock(issue_mutex_);
    DeviceScope scope(options().device);
    {
      std::lock_guard lock(state_->mutex);
      state_->throw_if_failed_locked(call.kind);
    }
    auto record = std::make_shared<Record>();
    record->kind = call.kind;
    if (payload_of(call) == 0) {
      record->outcome = Outcome::kDone;  // every rank agrees: nothing moves
      return std::make_unique<NcclWork>(state_, std::move(record));
    }
    if (scope.status() != cudaSuccess)
      fail_with_cuda(call.kind, scope.status(), "select the device");
    const cudaError_t created = cudaEventCreateWithFlags(&record->event, cudaEventDisableTiming);
    if (created != cudaSuccess) fail_with_cuda(call.kind, created, "create an event");
    // The barrier reads only its own value: it need not wait for the caller's work.
    if (input_stream_ && call.kind != Kind::kBarrier) {
      const cudaError_t recorded = cudaEventRecord(input_ready_, *input_stream_);
      if (recorded != cudaSuccess) fail_with_cuda(call.kind, recorded, "mark the input stream");
      const cudaError_t ordered = cudaStreamWaitEvent(stream_, input_ready_, 0);
      if (ordered != cudaSuccess) fail_with_cuda(call.kind, ordered, "wait for the input stream");
    }
    record->deadline = Clock::now() + options().timeout;
    enqueue(call, record->deadline);
    if (call.kind == Kind::kAllReduce && call.op == ReduceOp::kMean && options().world_size > 1) {
      const cudaError_t divided = nccl_mean::divide_in_place(
          call.data, call.count, mean_element(call.dtype), options().world_size, stream_);
      if (divided != cudaSuccess) fail_with_cuda(call.kind, divided, "divide the sum");
    }
    const cudaError_t recorded = cudaEventRecord(record->event, stream_);
    if (recorded != cudaSuccess) fail_with_cuda(call.kind, recorded, "record an event");
    std::lock_guard lock(state_->mutex);
    // An abort() from another thread since the enqueue did not see this record: fail it here.
    state_->throw_if_failed_locked(call.kind);
    state_->settle_completed_locked();
    state_->pending.push_back(record);
    return std::make_unique<NcclWork>(state_, std::move(record));
  }

  // An argument wrong on this rank alone: the group breaks now, naming this rank. (Its peers
  // learn of it only through their own timeout.)
  [[noreturn]] void fail_here(Kind kind, const std::string& detail) {
    DeviceScope scope(options().device);
    std::lock_guard lock(state_->mutex);
    state_->fail_locked({options().rank, state_->who() + ": " + detail});
    throw CommunicatorError(collective_kind_name(kind), options().rank, detail);
  }

  void abort(const std::string& reason) {
    DeviceScope scope(options().device);
    std::lock_guard lock(state_->mutex);
    state_->fail_locked({options().rank, state_->who() + " aborted: " + reason});
  }

 private:
  [[noreturn]] static void throw_setup_error(const NcclCommunicatorOptions& options,
                                             const std::string& detail) {
    throw CommunicatorError("rendezvous", std::nullopt,
                            "rank " + std::to_string(options.rank) + " of " +
                                std::to_string(options.world_size) + " on CUDA device " +
                                std::to_string(options.device) + ": " + detail);
  }

  void check_cuda(cudaError_t status, const char* what) const {
    if (status != cudaSuccess)
      throw_setup_error(options(), "could not " + std::string(what) + ": " + cuda_text(status));
  }

  // Joins the other ranks; bounded by the timeout (a missing rank aborts the joining).
  ncclComm_t init_nccl(const std::string& unique_id) const {
    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // every call returns at once, so a wait can always be abandoned
    ncclComm_t comm = nullptr;
    ncclResult_t state =
        ncclCommInitRankConfig(&comm, options().world_size, id, options().rank, &config);
    const auto deadline = Clock::now() + options().timeout;
    Backoff backoff;
    while (state == ncclInProgress && comm != nullptr) {
      if (Clock::now() >= deadline) {
        ncclCommAbort(comm);
        throw_setup_error(options(), "the " + std::to_string(options().world_size) +
                                         " ranks did not all join within " +
                                         std::to_string(options().timeout.count()) + " ms");
      }
      backoff.pause();
      ncclResult_t async = ncclSuccess;
      const ncclResult_t queried = ncclCommGetAsyncError(comm, &async);
      state = queried == ncclSuccess ? async : queried;
    }
    if (state != ncclSuccess || comm == nullptr) {
      if (comm != nullptr) ncclCommAbort(comm);
      throw_setup_error(options(), "NCCL could not create the communicator: " +
                                       nccl_text(state == ncclSuccess ? ncclInternalError : state));
    }
    return comm;
  }

  // Starts the NCCL call; the caller holds state_->mutex.
  ncclResult_t start_locked(const CollectiveCall& call) const {
    ncclComm_t comm = state_->comm;
    const auto count = static_cast<size_t>(call.count);
    switch (call.kind) {
      case Kind::kAllReduce:
      case Kind::kBarrier:
        return ncclAllReduce(call.data, call.data, count, nccl_type(call.dtype), ncclSum, comm,
                             stream_);
      case Kind::kBroadcast:
        return ncclBroadcast(call.data, call.data, count, ncclUint8, call.root, comm, stream_);
      case Kind::kAllGather:
        return ncclAllGather(call.send, call.data, count, ncclUint8, comm, stream_);
    }
    return ncclInvalidArgument;
  }

  // Enqueues the collective on stream_. A non-blocking communicator answers ncclInProgress and
  // launches from a helper thread (which also connects to peers on first use); until its state is
  // ncclSuccess nothing else may be called on it or launched on stream_, so this waits for that,
  // up to `deadline`. The query that sees ncclSuccess also joins NCCL's helper thread.
  void enqueue(const CollectiveCall& call, Clock::time_point deadline) {
    ncclResult_t state;
    {
      std::lock_guard lock(state_->mutex);
      state_->throw_if_failed_locked(call.kind);
      state = start_locked(call);
    }
    Backoff backoff;
    while (state == ncclInProgress) {
      if (Clock::now() >= deadline) fail(call.kind, state_->timed_out(call.kind));
      backoff.pause();
      std::lock_guard lock(state_->mutex);
      state_->throw_if_failed_locked(call.kind);  // aborted meanwhile
      state = state_->async_state_locked();
    }
    if (state != ncclSuccess) fail(call.kind, state_->nccl_failed(state));
  }

  [[noreturn]] void fail(Kind kind, Failure failure) {
    std::lock_guard lock(state_->mutex);
    state_->fail_locked(std::move(failure));
    throw state_->error_locked(kind);
  }

  [[noreturn]] void fail_with_cuda(Kind kind, cudaError_t status, const char* what) {
    cudaGetLastError();
    fail(kind, {std::nullopt, state_->who() + ": could not " + what + " for " +
                                  collective_kind_name(kind) + ": " + cuda_text(status)});
  }

  // Destroys the NCCL communicator when nothing is pending, else aborts it.
  void close() {
    std::lock_guard issue_lock(issue_mutex_);
    DeviceScope scope(options().device);
    {
      std::lock_guard lock(state_->mutex);
      state_->settle_completed_locked();
      const std::string closed = state_->who() + " closed its communicator";
      if (!state_->pending.empty()) {
        state_->fail_locked({options().rank, closed + " with collectives pending"});
      } else if (state_->comm != nullptr) {
        ncclCommDestroy(state_->comm);
        state_->comm = nullptr;
      }
      if (!state_->failure) state_->failure = Failure{options().rank, closed};
    }
    release_cuda();
  }

  void release_cuda() {
    // Ordered after anything still on stream_; neither call waits for it.
    if (barrier_value_ != nullptr) cudaFreeAsync(barrier_value_, stream_);
    if (input_ready_ != nullptr) cudaEventDestroy(input_ready_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    barrier_value_ = nullptr;
    input_ready_ = nullptr;
    stream_ = nullptr;
  }

  std::shared_ptr<State> state_;
  // One issue at a time: NCCL calls on one communicator must not interleave, and the issue order
  // is the order on stream_. Taken before state_->mutex.
  std::mutex issue_mutex_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t input_ready_ = nullptr;
  std::optional<cudaStream_t> input_stream_;
  void* barrier_value_ = nullptr;  // one float on the device: the barrier's all-reduce
};

NcclCommunicator::NcclCommunicator(const NcclCommunicatorOptions& options,
                                   const std::string& unique_id) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    throw std::invalid_argument("rank " + std::to_string(options.rank) + " outside a world of " +
                                std::to_string(options.world_size));
  }
  if (unique_id.size() != kNcclUniqueIdBytes) {
    throw std::invalid_argument("an NCCL unique id has " + std::to_string(kNcclUniqueIdBytes) +
                                " bytes, not " + std::to_string(unique_id.size()));
  }
  if (options.timeout.count() <= 0) {
    throw std::invalid_argument("the timeout must be positive, not " +
                                std::to_string(options.timeout.count()) + " ms");
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) {
    cudaGetLastError();
    devices = 0;
  }
  if (options.device < 0 || options.device >= devices) {
    throw std::invalid_argument("CUDA device " + std::to_string(options.device) + " outside the " +
                                std::to_string(devices) + " devices of this machine");
  }
  impl_ = std::make_unique<Impl>(options, unique_id);
}

NcclCommunicator::~NcclCommunicator() = default;

int NcclCommunicator::world_size() const { return impl_->options().world_size; }
int NcclCommunicator::rank() const { return impl_->options().rank; }
std::chrono::milliseconds NcclCommunicator::timeout() const { return impl_->options().timeout; }
int NcclCommunicator::device() const { return impl_->options().device; }
cudaStream_t NcclCommunicator::stream() const { return impl_->stream(); }
void NcclCommunicator::set_input_stream(cudaStream_t stream) { impl_->set_input_stream(stream); }

std::unique_ptr<CollectiveWork> NcclCommunicator::all_reduce_async(void* data, int64_t count,
                                                                   CommDType dtype, ReduceOp op) {
  if (count < 0) impl_->fail_here(Kind::kAllReduce, "negative count " + std::to_string(count));
  if (count > 0) {
    if (auto problem = device_memory_problem(data, device())) {
      impl_->fail_here(Kind::kAllReduce, "data is " + *problem);
    }
  }
  return impl_->issue(
      {.kind = Kind::kAllReduce, .data = data, .count = count, .dtype = dtype, .op = op});
}

std::unique_ptr<CollectiveWork> NcclCommunicator::broadcast_async(void* data, int64_t bytes,
                                                                  int root) {
  if (bytes < 0) impl_->fail_here(Kind::kBroadcast, "negative size " + std::to_string(bytes));
  if (root < 0 || root >= world_size()) {
    impl_->fail_here(Kind::kBroadcast, "root rank " + std::to_string(root) +
                                           " outside a world of " + std::to_string(world_size()));
  }
  if (bytes > 0) {
    if (auto problem = device_memory_problem(data, device())) {
      impl_->fail_here(Kind::kBroadcast, "data is " + *problem);
    }
  }
  return impl_->issue({.kind = Kind::kBroadcast, .data = data, .count = bytes, .root = root});
}

std::unique_ptr<CollectiveWork> NcclCommunicator::all_gather_async(const void* send, void* recv,
                                                                   int64_t bytes_per_rank) {
  if (bytes_per_rank < 0) {
    impl_->fail_here(Kind::kAllGather, "negative size " + std::to_string(bytes_per_rank));
  }
  if (bytes_per_rank > 0) {
    if (auto problem = device_memory_problem(send, device())) {
      impl_->fail_here(Kind::kAllGather, "send is " + *problem);
    }
    if (auto problem = device_memory_problem(recv, device())) {
      impl_->fail_here(Kind::kAllGather, "recv is " + *problem);
    }
    // NCCL reads send while it writes recv: only the in-place layout is safe.
    const auto send_at = reinterpret_cast<uintptr_t>(send);
    const auto recv_at = reinterpret_cast<uintptr_t>(recv);
    const auto bytes = static_cast<uintptr_t>(bytes_per_rank);
    const uintptr_t recv_end = recv_at + bytes * static_cast<uintptr_t>(world_size());
    const bool overlaps = send_at < recv_end && recv_at < send_at + bytes;
    const bool in_place = send_at == recv_at + bytes * static_cast<uintptr_t>(rank());
    if (overlaps && !in_place) {
      impl_->fail_here(Kind::kAllGather,
                       "send overlaps recv other than at this rank's part (recv + rank * bytes)");
    }
  }
  return impl_->issue(
      {.kind = Kind::kAllGather, .data = recv, .send = send, .count = bytes_per_rank});
}

void NcclCommunicator::barrier() {
  impl_
      ->issue({.kind = Kind::kBarrier,
               .data = impl_->barrier_value(),
               .count = 1,
               .dtype = CommDType::kF32,
               .op = ReduceOp::kSum})
      ->wait();
}

void NcclCommunicator::abort(const std::string& reason) { impl_->abort(reason); }

}  // namespace lomo
