// Storage dtypes of tensors and exact conversions between them and fp32.
// Arithmetic is always fp32; fp16/bf16 exist only as storage, converted with round-to-nearest-even.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "kernels/host_device.h"

namespace lomo {

enum class DType : uint8_t { kF32, kF16, kBF16 };

size_t dtype_size(DType dtype);
// Names as safetensors writes them: "F32", "F16", "BF16".
std::string_view dtype_name(DType dtype);
// Parses a safetensors dtype name; returns false for anything lomo cannot store.
bool parse_dtype(std::string_view name, DType* out);
// Parses a user-facing name ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16"); throws on
// others.
DType dtype_from_user_string(std::string_view name);

// The bits of a float and back. Device code (C++17, no std::bit_cast, no std::memcpy in kernels)
// uses the CUDA intrinsics; host code the memcpy idiom, which compilers reduce to a move.
LOMO_HOST_DEVICE inline uint32_t float_bits(float value) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

LOMO_HOST_DEVICE inline float float_from_bits(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

LOMO_HOST_DEVICE inline float bf16_to_float(uint16_t bits) {
  return float_from_bits(static_cast<uint32_t>(bits) << 16);
}

LOMO_HOST_DEVICE inline uint16_t float_to_bf16(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
  const uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

// bf16 with stochastic rounding: `random`'s low 16 bits decide. Adding a uniform 16-bit number
// below the cut and truncating rounds up with probability equal to the discarded fraction, so the
// result is unbiased in expectation. inf and NaN (all exponent bits set) round to nearest.
LOMO_HOST_DEVICE inline uint16_t float_to_bf16_stochastic(float value, uint64_t random) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7f800000u) == 0x7f800000u) return float_to_bf16(value);
  return static_cast<uint16_t>((bits + static_cast<uint32_t>(random & 0xffffu)) >> 16);
}

// IEEE half, built from bits so that host and device agree exactly (every fp16 value is a float).
LOMO_HOST_DEVICE inline float fp16_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa·2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return float_from_bits(float_bits(magnitude) | sign);
  }
  if (exponent == 31) return float_from_bits(sign | (mantissa ? 0x7fc00000u : 0x7f800000u));
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // rebias 15→127
}

// Round to nearest even, including fp16 subnormals; >= 65520 becomes infinity, NaN a quiet NaN.
LOMO_HOST_DEVICE inline uint16_t float_to_fp16(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs_bits >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: infinity
  const int32_t exponent = static_cast<int32_t>(abs_bits >> 23) - 127;
  if (exponent < -25) return sign;  // below half the smallest subnormal: zero
  const uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
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

// Converts `count` elements between a storage dtype and fp32.
void convert_to_float(DType from, const void* source, float* destination, size_t count);
void convert_from_float(DType to, const float* source, void* destination, size_t count);

}  // namespace lomo
