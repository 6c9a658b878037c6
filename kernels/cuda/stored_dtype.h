// Values stored as fp32, bf16 or fp16 in CUDA kernels, with the conversions of kernels/dtype.h (so
// the GPU gets the CPU's bits), and the one switch from a run-time DType to the kernel template
// instantiated for it. Device code: include from .cu files only.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/dtype.h"

namespace lomo::cuda {

// Element i of `values` stored as Dtype, widened to float.
template <DType Dtype>
__device__ inline float load_stored(const void* values, int64_t i) {
  if constexpr (Dtype == DType::kF32) {
    return static_cast<const float*>(values)[i];
  } else if constexpr (Dtype == DType::kBF16) {
    return bf16_to_float(static_cast<const uint16_t*>(values)[i]);
  } else {
    return fp16_to_float(static_cast<const uint16_t*>(values)[i]);
  }
}

template <DType Dtype>
using StoredDtype = std::integral_constant<DType, Dtype>;

// launch(StoredDtype<D>{}) for the D equal to `dtype`: launch is generic over the tag and reads
// the dtype as decltype(tag)::value.
template <typename Launch>
void with_stored_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kF32:
      launch(StoredDtype<DType::kF32>{});
      break;
    case DType::kBF16:
      launch(StoredDtype<DType::kBF16>{});
      break;
    case DType::kF16:
      launch(StoredDtype<DType::kF16>{});
      break;
  }
}

}  // namespace lomo::cuda
