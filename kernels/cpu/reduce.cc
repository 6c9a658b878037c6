#include "kernels/cpu/reduce.h"

#include <cmath>

#include "kernels/cpu/parallel_sum.h"

namespace lomo::cpu {

double sum_squares(const float* x, int64_t count) {
  return parallel_sum(count, [&](int64_t i) { return double(x[i]) * x[i]; });
}

double sum_squares(const void* x, DType dtype, int64_t count) {
  switch (dtype) {
    case DType::kF32:
      return sum_squares(static_cast<const float*>(x), count);
    case DType::kBF16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
      return parallel_sum(count, [&](int64_t i) {
        const double v = bf16_to_float(p[i]);
        return v * v;
      });
    }
    case DType::kF16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
      return parallel_sum(count, [&](int64_t i) {
        const double v = fp16_to_float(p[i]);
        return v * v;
      });
    }
  }
  return 0.0;
}

void accumulate_gradient_statistics(GradientStatistics* statistics, double tensor_sum_squares,
                                    int64_t tensor_index) {
  if (!std::isfinite(tensor_sum_squares) && statistics->first_non_finite < 0) {
    statistics->first_non_finite = tensor_index;
  }
  statistics->sum_squares += tensor_sum_squares;
}

}  // namespace lomo::cpu
