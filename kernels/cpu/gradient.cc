#include "kernels/cpu/gradient.h"

#include <algorithm>

#include "kernels/cpu/parallel_sum.h"
#include "kernels/cpu/reduce.h"

namespace lomo::cpu {

namespace {
template <typename RoundTrip>
void round_each(float* gradient, int64_t count, RoundTrip round_trip) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) gradient[i] = round_trip(gradient[i]);
}
}  // namespace

void round_gradient_to_dtype(float* gradient, int64_t count, DType dtype) {
  switch (dtype) {
    case DType::kF16:
      round_each(gradient, count, [](float g) { return fp16_to_float(float_to_fp16(g)); });
      return;
    case DType::kBF16:
      round_each(gradient, count, [](float g) { return bf16_to_float(float_to_bf16(g)); });
      return;
    case DType::kF32:
      return;
  }
}

void unscale_gradient(float* gradient, int64_t count, float unscale, int64_t tensor_index,
                      GradientStatistics* statistics) {
  // One pass: scale and square together (the same association as reduce.h's sum_squares).
  const double sum = parallel_sum(count, [&](int64_t i) {
    gradient[i] *= unscale;
    return static_cast<double>(gradient[i]) * gradient[i];
  });
  accumulate_gradient_statistics(statistics, sum, tensor_index);
}

void clip_gradient(float* gradient, int64_t count, bool clip_by_value, float clip_value,
                   float coefficient) {
  if (clip_by_value) {
    const float limit = clip_value;
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < count; ++i) {
      gradient[i] = std::clamp(gradient[i], -limit, limit) * coefficient;
    }
  } else if (coefficient != 1.0f) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < count; ++i) gradient[i] *= coefficient;
  }
}

}  // namespace lomo::cpu
