// Cross-entropy over logits on the GPU: the contract of kernels/cpu/cross_entropy.h with device
// pointers. Targets equal to kIgnoreIndex are skipped.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lomo::cuda {

// Fills logsumexp [rows]; *loss_sum (device) = Σ over counted rows of −log softmax[target],
// summed in row order (deterministic).
void cross_entropy_forward(double* loss_sum, float* logsumexp, const float* logits,
                           const int32_t* targets, int64_t rows, int64_t vocab,
                           cudaStream_t stream);
// dlogits = scale·(softmax − onehot), 0 for ignored rows; dlogits may alias logits.
void cross_entropy_backward(float* dlogits, const float* logits, const float* logsumexp,
                            const int32_t* targets, int64_t rows, int64_t vocab, float scale,
                            cudaStream_t stream);

}  // namespace lomo::cuda
