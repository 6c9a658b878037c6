#include "kernels/dtype.h"

#include <stdexcept>

namespace lomo {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

bool parse_dtype(std::string_view name, DType* out) {
  if (name == "F32") {
    *out = DType::kF32;
  } else if (name == "F16") {
    *out = DType::kF16;
  } else if (name == "BF16") {
    *out = DType::kBF16;
  } else {
    return false;
  }
  return true;
}

DType dtype_from_user_string(std::string_view name) {
  if (name == "fp32" || name == "float32" || name == "f32") return DType::kF32;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "fp16" || name == "float16" || name == "f16") return DType::kF16;
  throw std::invalid_argument("unknown dtype '" + std::string(name) +
                              "' (expected fp32, bf16 or fp16)");
}

void convert_to_float(DType from, const void* source, float* destination, size_t count) {
  switch (from) {
    case DType::kF32:
      std::memcpy(destination, source, count * sizeof(float));
      return;
    case DType::kBF16: {
      const auto* in = static_cast<const uint16_t*>(source);
#pragma omp parallel for schedule(static) if (count > (1u << 16))
      for (size_t i = 0; i < count; ++i) destination[i] = bf16_to_float(in[i]);
      return;
    }
    case DType::kF16: {
      const auto* in = static_cast<const uint16_t*>(source);
#pragma omp parallel for schedule(static) if (count > (1u << 16))
      for (size_t i = 0; i < count; ++i) destination[i] = fp16_to_float(in[i]);
      return;
    }
  }
}

void convert_from_float(DType to, const float* source, void* destination, size_t count) {
  switch (to) {
    case DType::kF32:
      std::memcpy(destination, source, count * sizeof(float));
      return;
    case DType::kBF16: {
      auto* out = static_cast<uint16_t*>(destination);
#pragma omp parallel for schedule(static) if (count > (1u << 16))
      for (size_t i = 0; i < count; ++i) out[i] = float_to_bf16(source[i]);
      return;
    }
    case DType::kF16: {
      auto* out = static_cast<uint16_t*>(destination);
#pragma omp parallel for schedule(static) if (count > (1u << 16))
      for (size_t i = 0; i < count; ++i) out[i] = float_to_fp16(source[i]);
      return;
    }
  }
}

}  // namespace lomo
