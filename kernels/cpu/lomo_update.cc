#include "kernels/cpu/lomo_update.h"

#include "kernels/cpu/write_back.h"

namespace lomo::cpu {

void lomo_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                 const SgdUpdate& update, const WriteBack& write_back,
                 const GradientStatistics* skip) {
  if (skip_update(skip)) return;
  const float keep = update.keep, step = update.step;
  update_parameter(parameter, dtype, count, write_back,
                   [=](int64_t i, float value) { return value * keep - step * gradient[i]; });
}

}  // namespace lomo::cpu
