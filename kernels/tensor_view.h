// A typed, non-owning view of a tensor in some device's memory: what crosses the seam between the
// engine and its consumers (the gradient sink), so that a consumer knows where the data is and how
// to read it without assuming host fp32.
#pragma once

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

#include "kernels/device.h"
#include "kernels/dtype.h"

namespace lomo {

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  std::span<const int64_t> shape;  // row-major extents; owned by whoever made the view
  Device device;

  int64_t numel() const {
    int64_t count = 1;
    for (int64_t extent : shape) count *= extent;
    return count;
  }
  size_t size_bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  // The data as fp32; throws std::logic_error when the view holds another dtype.
  float* f32() const {
    if (dtype != DType::kF32) {
      throw std::logic_error("TensorView::f32 on a " + std::string(dtype_name(dtype)) + " tensor");
    }
    return static_cast<float*>(data);
  }
};

}  // namespace lomo
