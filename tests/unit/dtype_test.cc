#include "kernels/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace lomo {
namespace {

float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 lies exactly between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808000u)), 0x3f80);
  // 1 + 3·2^-8 is the tie between 1+2^-7 (odd) and 1+2^-6: rounds up to even.
  EXPECT_EQ(float_to_bf16(from_bits(0x3f818000u)), 0x3f82);
  EXPECT_EQ(float_to_bf16(from_bits(0x3f808001u)), 0x3f81);  // just above the tie: up
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(bf16_to_float(float_to_bf16(-std::numeric_limits<float>::infinity())),
            -std::numeric_limits<float>::infinity());
}

TEST(Fp16, EveryHalfValueRoundTripsExactly) {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const float value = fp16_to_float(static_cast<uint16_t>(bits));
    if (std::isnan(value)) continue;
    ASSERT_EQ(float_to_fp16(value), bits) << "half bits " << bits;
  }
}

TEST(Fp16, RoundsToNearestEvenIncludingSubnormalsAndOverflow) {
  EXPECT_EQ(fp16_to_float(float_to_fp16(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(fp16_to_float(float_to_fp16(65520.0f))));  // the tie rounds to inf
  EXPECT_EQ(fp16_to_float(float_to_fp16(65519.0f)), 65504.0f);
  const float smallest = std::ldexp(1.0f, -24);
  EXPECT_EQ(fp16_to_float(float_to_fp16(smallest)), smallest);
  EXPECT_EQ(fp16_to_float(float_to_fp16(smallest / 2)), 0.0f);             // tie to even (0)
  EXPECT_EQ(fp16_to_float(float_to_fp16(smallest * 0.51f)), smallest);     // above the tie
  EXPECT_EQ(fp16_to_float(float_to_fp16(smallest * 1.5f)), 2 * smallest);  // tie to even (2)
  // 1 + 2^-11 is the tie between 1 and 1 + 2^-10.
  EXPECT_EQ(fp16_to_float(float_to_fp16(1.0f + std::ldexp(1.0f, -11))), 1.0f);
  EXPECT_EQ(float_to_fp16(-0.0f), 0x8000);
}

TEST(Fp16, MatchesExhaustiveNearestForRandomFloats) {
  // Nearest half by brute force over the candidates that bracket the value.
  uint32_t state = 12345;
  for (int n = 0; n < 200000; ++n) {
    state = state * 1664525u + 1013904223u;
    const float value = from_bits((state & 0x8fffffffu) | 0x30000000u);  // |v| in ~[2^-31, 2^33)
    if (!std::isfinite(value) || std::abs(value) >= 65504.0f) continue;
    const uint16_t got = float_to_fp16(value);
    const double error = std::abs(static_cast<double>(fp16_to_float(got)) - value);
    const double down =
        std::abs(static_cast<double>(fp16_to_float(static_cast<uint16_t>(got - 1))) - value);
    const double up =
        std::abs(static_cast<double>(fp16_to_float(static_cast<uint16_t>(got + 1))) - value);
    if ((got & 0x7fffu) != 0) {
      ASSERT_LE(error, down) << value;
    }
    if ((got & 0x7fffu) < 0x7bffu) {
      ASSERT_LE(error, up) << value;
    }
  }
}

TEST(DType, UserNamesAndSafetensorsNames) {
  EXPECT_EQ(dtype_from_user_string("bfloat16"), DType::kBF16);
  EXPECT_EQ(dtype_from_user_string("fp16"), DType::kF16);
  EXPECT_THROW(dtype_from_user_string("int8"), std::invalid_argument);
  DType parsed;
  EXPECT_TRUE(parse_dtype("BF16", &parsed));
  EXPECT_EQ(parsed, DType::kBF16);
  EXPECT_FALSE(parse_dtype("I64", &parsed));
}

}  // namespace
}  // namespace lomo
