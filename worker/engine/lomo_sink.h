// LOMO's fused update (Lv et al. 2023): each gradient updates its parameter the moment backward
// produces it, p ← p − lr·g, in fp32, written back to the storage dtype with round-to-nearest.
// The stabilisers (loss scaling, clipping, weight decay) and AdaLomo build on this sink.
#pragma once

#include "worker/engine/gradient_sink.h"

namespace lomo {

class LomoSink : public GradientSink {
 public:
  explicit LomoSink(float learning_rate) : learning_rate_(learning_rate) {}
  void set_learning_rate(float learning_rate) { learning_rate_ = learning_rate; }
  void consume(Parameter& parameter, float* gradient) override;

 private:
  float learning_rate_;
};

}  // namespace lomo
