#include "worker/optim/parameter_update.h"

#include <algorithm>

#include "kernels/cpu/parallel_sum.h"

namespace lomo {

void round_gradient_to_storage_dtype(const Parameter& parameter, float* gradient) {
  const int64_t count = parameter.numel();
  if (parameter.dtype == DType::kF16) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) gradient[i] = fp16_to_float(float_to_fp16(gradient[i]));
  } else if (parameter.dtype == DType::kBF16) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) gradient[i] = bf16_to_float(float_to_bf16(gradient[i]));
  }
}

double prepare_gradient_for_norm(const Parameter& parameter, float* gradient,
                                 const GradientPreparation& preparation) {
  round_gradient_to_storage_dtype(parameter, gradient);
  const int64_t count = parameter.numel();
  if (preparation.communicator != nullptr) {
    preparation.communicator->all_reduce(gradient, count, ReduceOp::kMean);
  }
  const float unscale = preparation.inverse_loss_scale;
  return cpu::parallel_sum(count, [&](int64_t i) {
    gradient[i] *= unscale;
    return static_cast<double>(gradient[i]) * gradient[i];
  });
}

void clip_gradient(const Parameter& parameter, float* gradient,
                   const GradientPreparation& preparation) {
  const int64_t count = parameter.numel();
  const float coefficient = preparation.clip_coefficient;
  if (preparation.clip_value) {
    const float limit = *preparation.clip_value;
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < count; ++i) {
      gradient[i] = std::clamp(gradient[i], -limit, limit) * coefficient;
    }
  } else if (coefficient != 1.0f) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < count; ++i) gradient[i] *= coefficient;
  }
}

double parameter_rms(const Parameter& parameter) {
  const int64_t count = parameter.numel();
  double sum_squares = 0.0;
  switch (parameter.dtype) {
    case DType::kF32: {
      const float* p = parameter.storage.as<float>();
      sum_squares = cpu::parallel_sum(count, [&](int64_t i) { return double(p[i]) * p[i]; });
      break;
    }
    case DType::kBF16: {
      const uint16_t* p = parameter.storage.as<uint16_t>();
      sum_squares = cpu::parallel_sum(count, [&](int64_t i) {
        const double v = bf16_to_float(p[i]);
        return v * v;
      });
      break;
    }
    case DType::kF16: {
      const uint16_t* p = parameter.storage.as<uint16_t>();
      sum_squares = cpu::parallel_sum(count, [&](int64_t i) {
        const double v = fp16_to_float(p[i]);
        return v * v;
      });
      break;
    }
  }
  return std::sqrt(sum_squares / static_cast<double>(std::max<int64_t>(1, count)));
}

}  // namespace lomo
