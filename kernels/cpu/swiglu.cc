#include "kernels/cpu/swiglu.h"

#include <cmath>

namespace lomo::cpu {

void swiglu_forward(float* out, const float* gate, const float* up, int64_t count) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t count) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const float g = gate[i];
    const float sigmoid = 1.0f / (1.0f + std::exp(-g));
    const float silu = g * sigmoid;
    dup[i] = dout[i] * silu;
    // d silu/dg = σ(g)·(1 + g·(1 − σ(g)))
    dgate[i] = dout[i] * up[i] * sigmoid * (1.0f + g * (1.0f - sigmoid));
  }
}

}  // namespace lomo::cpu
