#include "kernels/cuda/cuda_check.h"

namespace lomo::cuda {

void throw_cuda_error(cudaError_t status, const char* expression, const char* file, int line) {
  throw CudaError(std::string(file) + ":" + std::to_string(line) + ": " + expression +
                  " failed: " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

}  // namespace lomo::cuda
