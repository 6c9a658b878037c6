#include "kernels/cpu/adamw_update.h"

#include <cmath>

#include "kernels/cpu/write_back.h"

namespace lomo::cpu {

void adamw_update(void* parameter, DType dtype, int64_t count, const float* g, float* m, float* v,
                  const AdamWUpdate& u, const WriteBack& write_back,
                  const GradientStatistics* skip) {
  if (skip_update(skip)) return;
  const float b1 = u.beta1, b2 = u.beta2, correction1 = u.correction1, correction2 = u.correction2,
              step_size = u.step, eps = u.eps, keep = u.keep;
  update_parameter(parameter, dtype, count, write_back, [=](int64_t j, float value) {
    m[j] = b1 * m[j] + (1.0f - b1) * g[j];
    v[j] = b2 * v[j] + (1.0f - b2) * g[j] * g[j];
    const float denominator = std::sqrt(v[j] / correction2) + eps;
    return value * keep - step_size * (m[j] / correction1) / denominator;
  });
}

}  // namespace lomo::cpu
