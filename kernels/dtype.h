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

inline float bf16_to_float(uint16_t bits) {
  uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
  uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

// bf16 with stochastic rounding: `random`'s low 16 bits decide. Adding a uniform 16-bit number
// below the cut and truncating rounds up with probability equal to the discarded fraction, so the
// result is unbiased in expectation. inf and NaN round to nearest.
inline uint16_t float_to_bf16_stochastic(float value, uint64_t random) {
  if (!std::isfinite(value)) return float_to_bf16(value);
  const uint32_t bits = std::bit_cast<uint32_t>(value) + static_cast<uint32_t>(random & 0xffffu);
  return static_cast<uint16_t>(bits >> 16);
}

float fp16_to_float(uint16_t bits);
uint16_t float_to_fp16(float value);

// Converts `count` elements between a storage dtype and fp32.
void convert_to_float(DType from, const void* source, float* destination, size_t count);
void convert_from_float(DType to, const float* source, void* destination, size_t count);

}  // namespace lomo
