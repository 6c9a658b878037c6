// Collectives between the data-parallel ranks of one job attempt: the contract every
// implementation (single process, in-process threads for tests, Gloo on CPU, NCCL on GPU) keeps.
//
// Why it exists: every gradient is averaged across ranks inside the gradient sink before it is
// used, and the global norm is summed, so replicas never diverge (DESIGN.md, "The LOMO step",
// item 6). Why it is asynchronous: a later issue reduces tensor i while backward computes tensor
// i+1. Why it has a timeout: a dead peer must end the attempt with an error naming it, not hang.
//
// Contract (tests/unit/communicator_contract_test.cc holds every implementation to it):
// - Collectives are issued in the same order on every rank. Each returns a CollectiveWork; the
//   buffers belong to the collective until wait() returns. Works complete in issue order.
// - `data` points to memory of the communicator's device (host memory for CPU implementations).
// - wait() returns when the result is in place, or throws CommunicatorError naming the operation
//   and the peer (when known) if the collective failed or did not finish within the timeout. After
//   an error the communicator is broken: every later call throws CommunicatorError at once.
//   Arguments that are wrong on their own (a root outside the world, a negative count) throw
//   CommunicatorError too, from the call or from wait(), and break the communicator as well.
// - A failure on one rank (abort(), a closed or crashed rank, a timeout) reaches every rank: their
//   pending and later collectives throw CommunicatorError instead of hanging.
// - Results are identical on every rank (bit for bit): ranks never diverge by reduction order.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace lomo {

class MemoryAccountant;  // worker/engine/memory.h

enum class CommDType : uint8_t { kF32, kF64, kI64 };
size_t comm_dtype_size(CommDType dtype);
std::string_view comm_dtype_name(CommDType dtype);

// Which collective a call is; implementations compare it across ranks and name it in errors.
enum class CollectiveKind : uint8_t { kAllReduce, kBroadcast, kAllGather, kBarrier };
// "all_reduce", "broadcast", "all_gather", "barrier": the op a CommunicatorError names.
const char* collective_kind_name(CollectiveKind kind);

// kMean: the sum divided by world_size (for kI64 an integer division, which truncates toward zero).
enum class ReduceOp : uint8_t { kSum, kMean };

// One rank's collective call as an implementation records it: what it asked for and where its
// buffers are.
struct CollectiveCall {
  CollectiveKind kind = CollectiveKind::kBarrier;
  void* data = nullptr;        // all_reduce, broadcast: in place; all_gather: recv
  const void* send = nullptr;  // all_gather
  int64_t count = 0;           // all_reduce: elements; broadcast, all_gather: bytes (per rank)
  CommDType dtype = CommDType::kF32;
  ReduceOp op = ReduceOp::kSum;
  int root = 0;
};

// A collective that failed or timed out. op: e.g. "all_reduce"; peer: the rank that failed or did
// not answer, when the implementation knows it.
class CommunicatorError : public std::runtime_error {
 public:
  CommunicatorError(std::string op, std::optional<int> peer, const std::string& detail);
  const std::string& op() const { return op_; }
  std::optional<int> peer() const { return peer_; }

 private:
  std::string op_;
  std::optional<int> peer_;
};

// The handle of one issued collective.
class CollectiveWork {
 public:
  virtual ~CollectiveWork() = default;
  // Blocks until the collective is complete; throws CommunicatorError (see the contract above).
  virtual void wait() = 0;
  // True once wait() would return or throw without blocking.
  virtual bool is_done() const = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int world_size() const = 0;
  virtual int rank() const = 0;
  // The longest any collective may take before it fails with CommunicatorError.
  virtual std::chrono::milliseconds timeout() const = 0;

  // In place: every rank ends with op over the ranks' `count` elements.
  virtual std::unique_ptr<CollectiveWork> all_reduce_async(void* data, int64_t count,
                                                           CommDType dtype, ReduceOp op) = 0;
  // root's `bytes` bytes are copied into every rank's `data`.
  virtual std::unique_ptr<CollectiveWork> broadcast_async(void* data, int64_t bytes, int root) = 0;
  // Small values: rank r's `bytes_per_rank` bytes from `send` land at recv + r·bytes_per_rank on
  // every rank. `recv` holds world_size·bytes_per_rank bytes.
  virtual std::unique_ptr<CollectiveWork> all_gather_async(const void* send, void* recv,
                                                           int64_t bytes_per_rank) = 0;
  // Returns when every rank has entered the barrier (or throws).
  virtual void barrier() = 0;
  // Ends this rank's part in the group, e.g. when its training step failed: its own and its peers'
  // pending and later collectives throw CommunicatorError naming this rank, at once rather than
  // after the timeout. Any thread may call it (a watchdog, too); calls after the first change
  // nothing.
  virtual void abort(const std::string& reason) = 0;

  // Counts this communicator's own buffers (staging of messages) against `accountant` under
  // MemoryKind::kCommunication from now on, or against none for nullptr; what was counted against
  // the previous accountant moves to the new one. The memory itself stays the communicator's:
  // a collective that failed may still be written into later, after the accountant is gone.
  // Any thread, never throws. Implementations with no buffers of their own count nothing.
  virtual void set_buffer_accountant(MemoryAccountant* accountant) {}

  // Blocking forms.
  void all_reduce(void* data, int64_t count, CommDType dtype, ReduceOp op) {
    all_reduce_async(data, count, dtype, op)->wait();
  }
  void all_reduce(float* data, int64_t count, ReduceOp op) {
    all_reduce(data, count, CommDType::kF32, op);
  }
  void all_reduce(double* data, int64_t count, ReduceOp op) {
    all_reduce(data, count, CommDType::kF64, op);
  }
  void all_reduce(int64_t* data, int64_t count, ReduceOp op) {
    all_reduce(data, count, CommDType::kI64, op);
  }
  void broadcast(void* data, int64_t bytes, int root) {
    broadcast_async(data, bytes, root)->wait();
  }
  void all_gather(const void* send, void* recv, int64_t bytes_per_rank) {
    all_gather_async(send, recv, bytes_per_rank)->wait();
  }
};

// Counts `communicator`'s buffers against `accountant` for this object's lifetime: declared after
// the accountant it names, it detaches before that accountant is destroyed.
class CommunicationBufferAccounting {
 public:
  CommunicationBufferAccounting(Communicator& communicator, MemoryAccountant& accountant)
      : communicator_(communicator) {
    communicator_.set_buffer_accountant(&accountant);
  }
  ~CommunicationBufferAccounting() { communicator_.set_buffer_accountant(nullptr); }
  CommunicationBufferAccounting(const CommunicationBufferAccounting&) = delete;
  CommunicationBufferAccounting& operator=(const CommunicationBufferAccounting&) = delete;

 private:
  Communicator& communicator_;
};

}  // namespace lomo
