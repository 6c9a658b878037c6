#include "kernels/dtype.h"

#include <cmath>
#include <limits>
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

float fp16_to_float(uint16_t bits) {
  const uint32_t sign = (bits >> 15) & 1u;
  const int32_t exponent = (bits >> 10) & 0x1f;
  const uint32_t mantissa = bits & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  } else if (exponent == 31) {
    magnitude =
        mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

uint16_t float_to_fp16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: infinity
  const int32_t exponent = static_cast<int32_t>(abs_bits >> 23) - 127;
  if (exponent < -25) return sign;  // below half the smallest subnormal: zero
  uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
  // Number of low mantissa bits dropped: 13 for normals, more for fp16 subnormals.
  const int32_t shift = exponent < -14 ? 13 + (-14 - exponent) : 13;
  const uint32_t half_ulp = 1u << (shift - 1);
  const uint32_t remainder = mantissa & ((1u << shift) - 1);
  uint32_t result = mantissa >> shift;
  if (remainder > half_ulp || (remainder == half_ulp && (result & 1u))) ++result;
  if (exponent < -14)
    return sign | static_cast<uint16_t>(result);  // subnormal (may round up to normal)
  // Normal: result holds the implicit bit; a carry into bit 11 bumps the exponent correctly.
  return sign | static_cast<uint16_t>(((exponent + 15) << 10) + (result - 0x400u));
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
