// Sums over [0, count) in parallel with a fixed association: each thread adds one contiguous chunk
// and the chunk totals are added in chunk order. OpenMP's reduction clause combines partial sums in
// whatever order threads finish, which changes the last bits from run to run; values that feed
// an update (a clip coefficient, an AdaLomo moment) must be reproducible for a resumed run to equal
// an uninterrupted one. Deterministic for a given thread count.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lomo::cpu {

template <typename Term>
double parallel_sum(int64_t count, Term term) {
  const int threads = omp_get_max_threads();
  std::vector<double> partial(static_cast<size_t>(threads), 0.0);
  const int64_t chunk = (count + threads - 1) / threads;
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    const int64_t begin = std::min(count, thread * chunk);
    const int64_t end = std::min(count, begin + chunk);
    double sum = 0.0;
    for (int64_t i = begin; i < end; ++i) sum += term(i);
    partial[static_cast<size_t>(thread)] = sum;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace lomo::cpu
