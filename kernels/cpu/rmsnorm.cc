#include "kernels/cpu/rmsnorm.h"

#include <omp.h>

#include <cmath>
#include <vector>

namespace lomo::cpu {

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t rows,
                     int64_t dim, float eps) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = out + r * dim;
    float sum_squares = 0.0f;
    for (int64_t i = 0; i < dim; ++i) sum_squares += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(sum_squares / static_cast<float>(dim) + eps);
    rstd[r] = scale;
    for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * scale);
  }
}

void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                      const float* weight, const float* rstd, int64_t rows, int64_t dim) {
  const int threads = omp_get_max_threads();
  // Per-thread partial weight gradients, summed in a fixed order so results are deterministic.
  std::vector<float> partial(static_cast<size_t>(threads) * dim, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* my_dweight = partial.data() + static_cast<size_t>(omp_get_thread_num()) * dim;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * dim;
      const float* dyr = dout + r * dim;
      float* dxr = dx + r * dim;
      const float s = rstd[r];
      // dx = s·(g − x̂·mean(g∘x̂)) with g = dy∘w and x̂ = x·s.
      float dot = 0.0f;
      for (int64_t i = 0; i < dim; ++i) {
        dot += dyr[i] * weight[i] * xr[i];
        my_dweight[i] += dyr[i] * xr[i] * s;
      }
      const float coefficient = dot * s * s / static_cast<float>(dim);
      for (int64_t i = 0; i < dim; ++i) dxr[i] += s * (dyr[i] * weight[i] - xr[i] * coefficient);
    }
  }
  for (int64_t i = 0; i < dim; ++i) {
    float total = 0.0f;
    for (int t = 0; t < threads; ++t) total += partial[static_cast<size_t>(t) * dim + i];
    dweight[i] = total;
  }
}

}  // namespace lomo::cpu
