// SwiGLU on the GPU: element-wise, one thread per element over a grid-stride loop. The formulas
// are the CPU's (kernels/cpu/swiglu.cc) term for term; expf stands in for the CPU's fast_exp, both
// within a few ulp of exp.
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/swiglu.h"

namespace lomo::cuda {
namespace {

__global__ void swiglu_forward_kernel(float* __restrict__ out, const float* __restrict__ gate,
                                      const float* __restrict__ up, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += stride) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

__global__ void swiglu_backward_kernel(float* __restrict__ dgate, float* __restrict__ dup,
                                       const float* __restrict__ dout,
                                       const float* __restrict__ gate, const float* __restrict__ up,
                                       int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += stride) {
    const float g = gate[i];
    const float sigmoid = 1.0f / (1.0f + expf(-g));
    dup[i] = dout[i] * g * sigmoid;
    // d silu/dg = σ(g)·(1 + g·(1 − σ(g)))
    dgate[i] = dout[i] * up[i] * sigmoid * (1.0f + g * (1.0f - sigmoid));
  }
}

}  // namespace

void swiglu_forward(float* out, const float* gate, const float* up, int64_t count,
                    cudaStream_t stream) {
  if (count <= 0) return;
  swiglu_forward_kernel<<<blocks_for(count), kThreadsPerBlock, 0, stream>>>(out, gate, up, count);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  swiglu_backward_kernel<<<blocks_for(count), kThreadsPerBlock, 0, stream>>>(dgate, dup, dout, gate,
                                                                             up, count);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lomo::cuda
