// SwiGLU, the LLaMA MLP's gate: out = silu(gate) ∘ up, with silu(g) = g·sigmoid(g).
#pragma once

#include <cstdint>

namespace lomo::cpu {

void swiglu_forward(float* out, const float* gate, const float* up, int64_t count);
// Overwrites dgate and dup.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t count);

}  // namespace lomo::cpu
