// Where backward delivers each parameter's gradient the moment it is final (DESIGN.md, "The LOMO
// step"). The sink decides what happens: update the parameter (LOMO, AdaLomo), add its squares to
// a norm, or copy it for a test. Gradients never all exist at once.
#pragma once

#include "kernels/tensor_view.h"
#include "worker/engine/llama_weights.h"

namespace lomo {

class GradientSink {
 public:
  virtual ~GradientSink() = default;
  // `gradient` is d(loss)/d(parameter), laid out like the parameter (its shape), in the memory of
  // the model's device: fp32 today (gradient.f32()); its dtype says so. The memory belongs to the
  // engine and is reused after the call returns; the sink may modify it. Backward no longer needs
  // the parameter's value, so the sink may update it in place. Work the sink queues on the
  // device's backend runs before the engine's next use of the memory (calls run in issue order).
  virtual void consume(Parameter& parameter, const TensorView& gradient) = 0;
};

}  // namespace lomo
