#include "kernels/cpu/adalomo_update.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/reduce.h"
#include "kernels/cpu/write_back.h"

namespace lomo::cpu {
namespace {

// v ← β·v + (1−β)·(g² + ε₁) elementwise, then g ← g / sqrt(v).
void full_moment(int64_t count, float* v, float* g, double beta, double eps1) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const double value = beta * v[i] + (1.0 - beta) * (double(g[i]) * g[i] + eps1);
    v[i] = static_cast<float>(value);
    g[i] = static_cast<float>(g[i] / std::sqrt(static_cast<double>(v[i])));
  }
}

// Row and column means of g²+ε₁ into the running averages, then
// g ← g / sqrt(v̂), v̂[r][c] = row[r] / mean(row) · col[c].
void factored_moment(int64_t rows, int64_t cols, float* row, float* col, float* g, double beta,
                     double eps1) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (int64_t c = 0; c < cols; ++c) sum += double(g[r * cols + c]) * g[r * cols + c] + eps1;
    row[r] = static_cast<float>(beta * row[r] + (1.0 - beta) * sum / cols);
  }
  // Column sums: per-thread partial rows, combined in thread order (deterministic).
  const int threads = omp_get_max_threads();
  std::vector<double> partial(static_cast<size_t>(threads * cols), 0.0);
#pragma omp parallel num_threads(threads)
  {
    double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * cols;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c)
        mine[c] += double(g[r * cols + c]) * g[r * cols + c] + eps1;
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    double sum = 0.0;
    for (int t = 0; t < threads; ++t) sum += partial[static_cast<size_t>(t * cols + c)];
    col[c] = static_cast<float>(beta * col[c] + (1.0 - beta) * sum / rows);
  }
  double row_mean = 0.0;
  for (int64_t r = 0; r < rows; ++r) row_mean += row[r];
  row_mean /= static_cast<double>(rows);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const double row_factor = 1.0 / std::sqrt(row[r] / row_mean);
    for (int64_t c = 0; c < cols; ++c) {
      g[r * cols + c] =
          static_cast<float>(g[r * cols + c] * row_factor / std::sqrt(static_cast<double>(col[c])));
    }
  }
}

}  // namespace

void adalomo_update(void* parameter, DType dtype, int64_t rows, int64_t cols, float* g,
                    float* exp_avg_sq_row, float* exp_avg_sq_col, float* exp_avg_sq,
                    const AdaLomoUpdate& u, const WriteBack& write_back,
                    const GradientStatistics* skip) {
  if (skip_update(skip)) return;
  const int64_t count = cols > 0 ? rows * cols : rows;
  if (cols > 0) {
    factored_moment(rows, cols, exp_avg_sq_row, exp_avg_sq_col, g, u.beta, u.eps1);
  } else {
    full_moment(count, exp_avg_sq, g, u.beta, u.eps1);
  }
  // Update normalisation: U ← U / max(1, RMS(U)/d).
  const double rms_update = std::sqrt(sum_squares(g, count) / static_cast<double>(count));
  const double scale = 1.0 / std::max(1.0, rms_update / u.clip_threshold);
  // Relative step: α = lr·max(ε₂, RMS(θ)), RMS of the parameter before this update.
  const double parameter_rms = std::sqrt(sum_squares(parameter, dtype, count) /
                                         static_cast<double>(std::max<int64_t>(1, count)));
  const double alpha = u.lr * std::max(u.eps2, parameter_rms);
  const float step = static_cast<float>(alpha * scale);
  const float keep = u.weight_decay > 0.0 ? static_cast<float>(1.0 - alpha * u.weight_decay) : 1.0f;
  update_parameter(parameter, dtype, count, write_back,
                   [=](int64_t i, float value) { return value * keep - step * g[i]; });
}

}  // namespace lomo::cpu
