// The communicator of a GPU rank in a gang: tensors in device memory (gradients) go over NCCL,
// values in host memory (loss sums, token counts, stop votes, weight fingerprints) over the host
// communicator (Gloo), each chosen per call from where its buffer lives. NCCL alone cannot take
// host memory, and a trainer's scalars are host values; copying each to the device and back
// would add a synchronisation per scalar instead.
//
// Both communicators are of the same ranks (same world size and rank, checked). barrier() runs on
// the host one; abort() ends both, so a peer blocked in either learns of it (the host one tells
// its peers at once; NCCL cannot, its peers reach their timeout).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "worker/comm/communicator.h"

namespace lomo {

class DeviceAwareCommunicator final : public Communicator {
 public:
  // Throws std::invalid_argument when the two differ in world size or rank.
  DeviceAwareCommunicator(std::unique_ptr<Communicator> host, std::unique_ptr<Communicator> device);

  // True for CUDA device (or managed) memory, false for host memory.
  static bool is_device_memory(const void* data);

  int world_size() const override { return host_->world_size(); }
  int rank() const override { return host_->rank(); }
  std::chrono::milliseconds timeout() const override;
  std::unique_ptr<CollectiveWork> all_reduce_async(void* data, int64_t count, CommDType dtype,
                                                   ReduceOp op) override;
  std::unique_ptr<CollectiveWork> broadcast_async(void* data, int64_t bytes, int root) override;
  // send and recv must both be host memory or both device memory.
  std::unique_ptr<CollectiveWork> all_gather_async(const void* send, void* recv,
                                                   int64_t bytes_per_rank) override;
  void barrier() override { host_->barrier(); }
  void abort(const std::string& reason) override;
  void set_buffer_accountant(MemoryAccountant* accountant) override;

 private:
  Communicator& for_buffer(const void* data) { return is_device_memory(data) ? *device_ : *host_; }

  std::unique_ptr<Communicator> host_;
  std::unique_ptr<Communicator> device_;
};

}  // namespace lomo
