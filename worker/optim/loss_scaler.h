// Dynamic loss scaling for fp16 (DESIGN.md, "The LOMO step", item 5): start at `initial`, multiply
// by `factor` after `growth_interval` consecutive clean steps, divide by it (not below `min`) and
// skip the step on overflow. Unlike the reference implementation's refactored scaler, it grows
// back.
#pragma once

#include <cstdint>

namespace lomo {

struct LossScalerOptions {
  double initial = 65536.0;
  int64_t growth_interval = 1000;
  double factor = 2.0;
  double min = 1.0;
};

struct LossScalerState {
  double scale = 65536.0;
  int64_t clean_steps = 0;  // consecutive clean steps since the last change
  int64_t overflows = 0;    // total skipped steps, for metrics
  bool operator==(const LossScalerState&) const = default;
};

class DynamicLossScaler {
 public:
  explicit DynamicLossScaler(const LossScalerOptions& options);
  double scale() const { return state_.scale; }
  // Call once per step with whether any gradient was inf/NaN; returns true if the step must be
  // skipped.
  bool update(bool overflow);
  const LossScalerState& state() const { return state_; }
  void restore(const LossScalerState& state) { state_ = state; }

 private:
  LossScalerOptions options_;
  LossScalerState state_;
};

}  // namespace lomo
