#include "worker/comm/nccl_mean.h"

namespace lomo::nccl_mean {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill an H100 several times over; the grid-stride loop covers the rest.
constexpr int64_t kMaxBlocks = 4096;

template <typename T>
__global__ void divide_kernel(T* data, int64_t count, T divisor) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    data[i] = data[i] / divisor;
  }
}

template <typename T>
cudaError_t launch(void* data, int64_t count, int divisor, cudaStream_t stream) {
  const int64_t wanted = (count + kThreads - 1) / kThreads;
  const auto blocks = static_cast<unsigned>(wanted < kMaxBlocks ? wanted : kMaxBlocks);
  divide_kernel<T>
      <<<blocks, kThreads, 0, stream>>>(static_cast<T*>(data), count, static_cast<T>(divisor));
  return cudaGetLastError();
}

}  // namespace

cudaError_t divide_in_place(void* data, int64_t count, Element element, int divisor,
                            cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  switch (element) {
    case Element::kF32:
      return launch<float>(data, count, divisor, stream);
    case Element::kF64:
      return launch<double>(data, count, divisor, stream);
    case Element::kI64:
      return launch<int64_t>(data, count, divisor, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lomo::nccl_mean
