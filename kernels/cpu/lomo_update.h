// LOMO's update rule, which is plain SGD's applied per tensor inside backward; the materialised SGD
// baseline uses the same kernel after backward.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/kernel_types.h"

namespace lomo::cpu {

// p ← p·keep − step·g in fp32, written back into p's dtype. `parameter` holds `count` values of
// `dtype`, `gradient` `count` fp32 values. Does nothing when `skip` (may be null) records a
// non-finite gradient.
void lomo_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                 const SgdUpdate& update, const WriteBack& write_back,
                 const GradientStatistics* skip);

}  // namespace lomo::cpu
