// The Communicator contract (communicator.h) between GPUs, over NCCL: `data` is device memory of
// the communicator's GPU.
//
// How it keeps the contract:
// - Asynchronous: collectives run on the communicator's own non-blocking CUDA stream, in issue
//   order; each work carries a CUDA event recorded after its collective. wait() polls that event,
//   so the calling thread never blocks inside CUDA or NCCL, where nothing could end the wait.
// - Timeout: NCCL runs as a non-blocking communicator (ncclConfig_t.blocking = 0), which can be
//   aborted at any moment. A wait that outlives the collective's deadline (its issue time plus
//   timeout()), or that sees NCCL report an asynchronous error, aborts the NCCL communicator
//   (ncclCommAbort, which also stops its kernels) and throws CommunicatorError naming the op.
//   Nothing else watches the deadline: a collective nobody waits for is not timed out.
// - Broken after an error: the first failure (a timeout, an NCCL or CUDA error, a wrong argument,
//   abort()) is kept; every pending work that had not completed by then, and every later call,
//   throws CommunicatorError with it at once.
// - Bit-identical results: NCCL reduces each element once along one fixed order and then copies
//   it to every rank (ring, tree and NVLS alike). kMean is that sum divided by world_size on the
//   device (nccl_mean.h), not NCCL's ncclAvg, which scales the inputs before summing.
// - What it cannot do: NCCL has no way to tell a peer that this rank aborted or closed. Peers
//   blocked on this rank learn of it through their own timeout (or an NCCL remote error when the
//   transport notices a dead connection), and then without knowing which rank failed.
//
// Device memory and streams: the caller makes sure a collective's input is complete before the
// collective runs, either by finishing the producing work first (cudaStreamSynchronize) or with
// set_input_stream(). After wait() returns the result is complete on the device, for any stream.
#pragma once

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "worker/comm/communicator.h"

namespace lomo {

struct NcclCommunicatorOptions {
  int rank = 0;
  int world_size = 1;
  // CUDA device index of this rank's GPU; every rank of a communicator has a GPU of its own.
  int device = 0;
  // Bounds the rendezvous (communicator construction) and every collective.
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
};

// Size of an NCCL unique id (NCCL_UNIQUE_ID_BYTES).
constexpr size_t kNcclUniqueIdBytes = 128;

// A new NCCL unique id (kNcclUniqueIdBytes raw bytes): rank 0 makes one per communicator
// and hands it to every rank (through the rendezvous store: nccl_rendezvous.h). It also starts,
// in this process, the bootstrap listener the ranks first connect to. Throws CommunicatorError
// (op "rendezvous") when NCCL cannot make one (no usable network interface).
std::string nccl_unique_id();

class NcclCommunicator final : public Communicator {
 public:
  // Joins the world_size ranks that were given the same `unique_id` (from nccl_unique_id());
  // blocks until all have joined. Throws std::invalid_argument for options or an id that are
  // wrong on their own, and CommunicatorError (op "rendezvous") when NCCL fails or the ranks have
  // not all joined within options.timeout.
  NcclCommunicator(const NcclCommunicatorOptions& options, const std::string& unique_id);
  // With no collective pending, destroys the NCCL communicator; otherwise aborts it (its
  // pending works throw). Peers are not told (see above).
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int world_size() const override;
  int rank() const override;
  std::chrono::milliseconds timeout() const override;
  int device() const;
  // The stream the collectives run on; owned by the communicator.
  cudaStream_t stream() const;
  // Collectives issued from now on start only after the work queued on `stream` when each is
  // issued (a device-side dependency, no host wait). For a caller that computes its inputs on
  // `stream` (the CUDA backend's). `stream` must outlive the communicator or a later call here.
  void set_input_stream(cudaStream_t stream);

  // `data` (all_reduce, broadcast) and `send`/`recv` (all_gather) must be device memory of
  // device() (or managed memory); other pointers throw CommunicatorError. all_gather may run in
  // place with send == recv + rank·bytes_per_rank; any other overlap of send and recv throws.
  std::unique_ptr<CollectiveWork> all_reduce_async(void* data, int64_t count, CommDType dtype,
                                                   ReduceOp op) override;
  std::unique_ptr<CollectiveWork> broadcast_async(void* data, int64_t bytes, int root) override;
  std::unique_ptr<CollectiveWork> all_gather_async(const void* send, void* recv,
                                                   int64_t bytes_per_rank) override;
  // An all-reduce of one value, waited for.
  void barrier() override;
  void abort(const std::string& reason) override;

  class Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace lomo
