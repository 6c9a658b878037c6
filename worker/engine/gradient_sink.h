// Where backward delivers each parameter's gradient the moment it is final (DESIGN.md, "The LOMO
// step"). The sink decides what happens: update the parameter (LOMO, AdaLomo), add its squares to
// a norm, or copy it for a test. Gradients never all exist at once.
#pragma once

#include "worker/engine/llama_weights.h"

namespace lomo {

class GradientSink {
 public:
  virtual ~GradientSink() = default;
  // `gradient` holds parameter.numel() fp32 values, d(loss)/d(parameter), laid out like the
  // parameter. The buffer belongs to the engine and is reused after the call returns; the sink may
  // modify it. Backward no longer needs the parameter's value, so the sink may update it in place.
  virtual void consume(Parameter& parameter, float* gradient) = 0;
};

}  // namespace lomo
