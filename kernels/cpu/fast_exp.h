// exp(x) for fp32 written so that GCC vectorises it inside `#pragma omp simd` loops, which a libm
// call prevents (and so do std::floor and std::fmin/fmax with GCC 12 here: hence the integer
// rounding and std::clamp). GCC 12 vectorises it only in files compiled with -fno-trapping-math
// (kernels/CMakeLists.txt says which); elsewhere those loops stay scalar. Cody-Waite reduction x =
// n·ln2 + r, |r| ≤ ln2/2, then the Cephes expf polynomial: within 2 ulp of expf over [-87, 88].
// Below −87.3 it returns ~1e-38 instead of a subnormal or 0, which no softmax or sigmoid here can
// tell apart; NaN stays NaN.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>

namespace lomo::cpu {

inline float fast_exp(float x) {
  x = std::clamp(x, -87.3f, 88.7f);
  // floor(x·log2e + 0.5) by truncation of a positive number: the clamp keeps x·log2e > −127.
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace lomo::cpu
