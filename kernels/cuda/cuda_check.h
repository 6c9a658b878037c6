// CUDA errors become exceptions carrying the call site, so failures are values a test can see.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace lomo::cuda {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

void throw_cuda_error(cudaError_t status, const char* expression, const char* file, int line);

// Number of usable CUDA devices; 0 (not an error) when there is no driver or no device.
int device_count();

}  // namespace lomo::cuda

#define LOMO_CUDA_CHECK(expression)                                                  \
  do {                                                                               \
    const cudaError_t lomo_status_ = (expression);                                   \
    if (lomo_status_ != cudaSuccess) {                                               \
      ::lomo::cuda::throw_cuda_error(lomo_status_, #expression, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)
