// AdaLomo (Lv et al. 2023b) for one tensor inside backward, as in the authors' code:
// Adafactor-style second moments (row and column means of g² + ε₁ for a matrix, full for a
// vector), β from the caller (1 − t^−0.8), update normalisation U ← U / max(1, RMS(U)/d), relative
// step α = lr·max(ε₂, RMS(θ)) with RMS(θ) before the update, decoupled weight decay θ·(1 − α·wd).
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_types.h"

namespace lomo::cpu {

// parameter: rows·cols values of `dtype` (a vector: rows = count, cols = 0). gradient: as many
// fp32 values, overwritten with the normalised update. A matrix uses exp_avg_sq_row [rows] and
// exp_avg_sq_col [cols]; a vector uses exp_avg_sq [rows]; the unused pointers may be null. Does
// nothing when `skip` (may be null) records a non-finite gradient.
void adalomo_update(void* parameter, DType dtype, int64_t rows, int64_t cols, float* gradient,
                    float* exp_avg_sq_row, float* exp_avg_sq_col, float* exp_avg_sq,
                    const AdaLomoUpdate& update, const WriteBack& write_back,
                    const GradientStatistics* skip);

}  // namespace lomo::cpu
