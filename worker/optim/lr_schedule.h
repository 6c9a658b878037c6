// Learning rate as a function of the step (1-based): linear warmup (step s of w runs at
// peak·s/(w+1), never 0), then constant, or linear or cosine decay towards 0 reached just after the
// last step.
#pragma once

#include <cstdint>
#include <string>

namespace lomo {

struct LrSchedule {
  enum class Kind { kConstant, kLinear, kCosine };
  Kind kind = Kind::kConstant;
  double peak_lr = 1e-3;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;

  // `kind_name` is constant | linear | cosine; warmup is warmup_steps, or warmup_ratio of the total
  // (rounded up) when warmup_steps is 0.
  static LrSchedule make(const std::string& kind_name, double peak_lr, int64_t warmup_steps,
                         double warmup_ratio, int64_t total_steps);
  double at(int64_t step) const;
};

}  // namespace lomo
