// The loop every CPU update kernel shares: p ← update(i, p) in fp32 for each element of a
// parameter stored as fp32, bf16 or fp16, written back with WriteBack's rounding.
#pragma once

#include <cstdint>

#include "kernels/counter_hash.h"
#include "kernels/dtype.h"
#include "kernels/kernel_types.h"

namespace lomo::cpu {

template <typename UpdateFunction>
void update_parameter(void* data, DType dtype, int64_t count, const WriteBack& write_back,
                      UpdateFunction update) {
  switch (dtype) {
    case DType::kF32: {
      float* p = static_cast<float*>(data);
#pragma omp parallel for simd schedule(static)
      for (int64_t i = 0; i < count; ++i) p[i] = update(i, p[i]);
      return;
    }
    case DType::kBF16: {
      uint16_t* p = static_cast<uint16_t*>(data);
      const uint64_t stream = mix_bits(write_back.seed ^ mix_bits(write_back.step) ^
                                       mix_bits(~static_cast<uint64_t>(write_back.tensor_index)));
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < count; ++i) {
        const float value = update(i, bf16_to_float(p[i]));
        p[i] = write_back.stochastic
                   ? float_to_bf16_stochastic(value, mix_bits(stream + static_cast<uint64_t>(i)))
                   : float_to_bf16(value);
      }
      return;
    }
    case DType::kF16: {
      uint16_t* p = static_cast<uint16_t*>(data);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < count; ++i) p[i] = float_to_fp16(update(i, fp16_to_float(p[i])));
      return;
    }
  }
}

// True when an earlier gradient kernel of this pass found inf/NaN: update kernels then leave the
// parameter (and their state) untouched, so a non-finite gradient never reaches the weights even
// though the host looks at the flag only once per pass.
inline bool skip_update(const GradientStatistics* statistics) {
  return statistics != nullptr && statistics->first_non_finite >= 0;
}

}  // namespace lomo::cpu
