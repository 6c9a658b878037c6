// RMSNorm as LLaMA defines it: y = w ∘ x / sqrt(mean(x²) + eps), over the last dimension.
#pragma once

#include <cstdint>

namespace lomo::cpu {

// x, out: [rows, dim]; rstd: [rows] receives 1/sqrt(mean(x²)+eps) for the backward pass.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* weight, int64_t rows,
                     int64_t dim, float eps);
// Adds the input gradient to dx (the residual stream's gradient, so accumulation is the natural
// form) and overwrites dweight [dim] with the weight gradient.
void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x,
                      const float* weight, const float* rstd, int64_t rows, int64_t dim);

}  // namespace lomo::cpu
