#include "kernels/cpu/swiglu.h"

#include <omp.h>

#include <algorithm>

#include "kernels/cpu/fast_exp.h"

namespace lomo::cpu {
namespace {

// Splits [0, count) into one contiguous range per thread. The element loops take restrict
// pointers as plain arguments so that they vectorise (see fast_exp.h).
template <typename RangeFunction>
void for_each_thread_range(int64_t count, RangeFunction function) {
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t chunk = (count + threads - 1) / threads;
    const int64_t begin = std::min(count, thread * chunk), end = std::min(count, begin + chunk);
    function(begin, end);
  }
}

void swiglu_forward_range(float* __restrict out, const float* __restrict gate,
                          const float* __restrict up, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + fast_exp(-g)) * up[i];
  }
}

void swiglu_backward_range(float* __restrict dgate, float* __restrict dup,
                           const float* __restrict dout, const float* __restrict gate,
                           const float* __restrict up, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float g = gate[i];
    const float sigmoid = 1.0f / (1.0f + fast_exp(-g));
    dup[i] = dout[i] * g * sigmoid;
    // d silu/dg = σ(g)·(1 + g·(1 − σ(g)))
    dgate[i] = dout[i] * up[i] * sigmoid * (1.0f + g * (1.0f - sigmoid));
  }
}

}  // namespace

void swiglu_forward(float* out, const float* gate, const float* up, int64_t count) {
  for_each_thread_range(
      count, [&](int64_t begin, int64_t end) { swiglu_forward_range(out, gate, up, begin, end); });
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t count) {
  for_each_thread_range(count, [&](int64_t begin, int64_t end) {
    swiglu_backward_range(dgate, dup, dout, gate, up, begin, end);
  });
}

}  // namespace lomo::cpu
