#include "worker/engine/lomo_sink.h"

namespace lomo {

void LomoSink::consume(Parameter& parameter, float* gradient) {
  const int64_t count = parameter.numel();
  const float lr = learning_rate_;
  switch (parameter.dtype) {
    case DType::kF32: {
      float* p = parameter.storage.as<float>();
#pragma omp parallel for simd schedule(static)
      for (int64_t i = 0; i < count; ++i) p[i] -= lr * gradient[i];
      return;
    }
    case DType::kBF16: {
      uint16_t* p = parameter.storage.as<uint16_t>();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < count; ++i)
        p[i] = float_to_bf16(bf16_to_float(p[i]) - lr * gradient[i]);
      return;
    }
    case DType::kF16: {
      uint16_t* p = parameter.storage.as<uint16_t>();
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < count; ++i)
        p[i] = float_to_fp16(fp16_to_float(p[i]) - lr * gradient[i]);
      return;
    }
  }
}

}  // namespace lomo
