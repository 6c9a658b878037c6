#include "worker/comm/device_aware_communicator.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

namespace lomo {

DeviceAwareCommunicator::DeviceAwareCommunicator(std::unique_ptr<Communicator> host,
                                                 std::unique_ptr<Communicator> device)
    : host_(std::move(host)), device_(std::move(device)) {
  if (!host_ || !device_) {
    throw std::invalid_argument("DeviceAwareCommunicator: both communicators are needed");
  }
  if (host_->world_size() != device_->world_size() || host_->rank() != device_->rank()) {
    throw std::invalid_argument(
        "DeviceAwareCommunicator: the host communicator is rank " + std::to_string(host_->rank()) +
        " of " + std::to_string(host_->world_size()) + ", the device one rank " +
        std::to_string(device_->rank()) + " of " + std::to_string(device_->world_size()));
  }
}

bool DeviceAwareCommunicator::is_device_memory(const void* data) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, data) != cudaSuccess) {
    cudaGetLastError();  // an unknown pointer is host memory; clear the sticky-free error
    return false;
  }
  return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
}

std::chrono::milliseconds DeviceAwareCommunicator::timeout() const {
  return std::max(host_->timeout(), device_->timeout());
}

std::unique_ptr<CollectiveWork> DeviceAwareCommunicator::all_reduce_async(void* data, int64_t count,
                                                                          CommDType dtype,
                                                                          ReduceOp op) {
  return for_buffer(data).all_reduce_async(data, count, dtype, op);
}

std::unique_ptr<CollectiveWork> DeviceAwareCommunicator::broadcast_async(void* data, int64_t bytes,
                                                                         int root) {
  return for_buffer(data).broadcast_async(data, bytes, root);
}

std::unique_ptr<CollectiveWork> DeviceAwareCommunicator::all_gather_async(const void* send,
                                                                          void* recv,
                                                                          int64_t bytes_per_rank) {
  const bool on_device = is_device_memory(recv);
  if (is_device_memory(send) != on_device) {
    throw CommunicatorError("all_gather", std::nullopt,
                            "send and recv must both be host memory or both device memory");
  }
  return (on_device ? *device_ : *host_).all_gather_async(send, recv, bytes_per_rank);
}

void DeviceAwareCommunicator::abort(const std::string& reason) {
  host_->abort(reason);
  device_->abort(reason);
}

void DeviceAwareCommunicator::set_buffer_accountant(MemoryAccountant* accountant) {
  host_->set_buffer_accountant(accountant);
  device_->set_buffer_accountant(accountant);
}

}  // namespace lomo
