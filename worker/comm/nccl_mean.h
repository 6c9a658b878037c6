// The division that turns NCCL's all-reduce sum into the contract's mean (communicator.h): NCCL's
// own ncclAvg scales each rank's input before summing, which is not the sum divided by
// world_size in floating point, and has no integer form that truncates toward zero.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lomo::nccl_mean {

enum class Element : uint8_t { kF32, kF64, kI64 };

// Divides `count` elements at device pointer `data` by `divisor` (> 0) in place, on `stream`:
// floats by IEEE division (correctly rounded, as on the host), int64 by C++ integer division
// (truncating toward zero). Launches nothing when count <= 0. Returns the launch status.
cudaError_t divide_in_place(void* data, int64_t count, Element element, int divisor,
                            cudaStream_t stream);

}  // namespace lomo::nccl_mean
