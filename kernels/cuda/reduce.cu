// Dtype widening, sums of squares and gradient preparation on the GPU: kernels/cpu/reduce.cc and
// kernels/cpu/gradient.cc element for element, with the conversions of kernels/dtype.h (the same
// functions the CPU calls, so the bits agree). Sums are deterministic (launch.h): a fixed grid of
// kReductionBlocks blocks writes one double partial each, and one block adds the partials in a
// fixed tree; no floating-point atomics, so every run gives the same bits.
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/reduce.h"
#include "kernels/cuda/stored_dtype.h"

namespace lomo::cuda {
namespace {

static_assert(kThreadsPerBlock == 256, "block_sum's shared array is sized for 256 threads");

__device__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Square and add without contraction into an FMA, as the CPU loop rounds: v² rounded, then added.
__device__ double add_square(double sum, double v) { return __dadd_rn(sum, __dmul_rn(v, v)); }

// Sum over a block of kThreadsPerBlock threads, a fixed tree; the result is valid in thread 0.
__device__ double block_sum(double value) {
  __shared__ double shared[kThreadsPerBlock];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int width = kThreadsPerBlock / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) {
      shared[threadIdx.x] = __dadd_rn(shared[threadIdx.x], shared[threadIdx.x + width]);
    }
    __syncthreads();
  }
  return shared[0];
}

// ---- Element-wise -------------------------------------------------------------------------------

template <DType Dtype>
__global__ void convert_kernel(float* out, const void* in, int64_t count) {
  for (int64_t i = first_index(); i < count; i += grid_stride()) out[i] = load_stored<Dtype>(in, i);
}

// The functions of kernels/dtype.h, so that narrowing gives the CPU's bits.
template <DType Dtype>
__global__ void narrow_kernel(uint16_t* out, const float* in, int64_t count) {
  static_assert(Dtype != DType::kF32, "fp32 is a copy");
  for (int64_t i = first_index(); i < count; i += grid_stride())
    out[i] = Dtype == DType::kBF16 ? float_to_bf16(in[i]) : float_to_fp16(in[i]);
}

template <DType Dtype>
__global__ void round_trip_kernel(float* gradient, int64_t count) {
  for (int64_t i = first_index(); i < count; i += grid_stride()) {
    if constexpr (Dtype == DType::kBF16) {
      gradient[i] = bf16_to_float(float_to_bf16(gradient[i]));
    } else {
      gradient[i] = fp16_to_float(float_to_fp16(gradient[i]));
    }
  }
}

// std::clamp's definition (a NaN passes through), then the coefficient.
__global__ void clip_by_value_kernel(float* gradient, int64_t count, float limit,
                                     float coefficient) {
  for (int64_t i = first_index(); i < count; i += grid_stride()) {
    const float g = gradient[i];
    const float clamped = g < -limit ? -limit : (limit < g ? limit : g);
    gradient[i] = clamped * coefficient;
  }
}

__global__ void scale_kernel(float* gradient, int64_t count, float coefficient) {
  for (int64_t i = first_index(); i < count; i += grid_stride()) gradient[i] *= coefficient;
}

// ---- Reductions ---------------------------------------------------------------------------------

template <DType Dtype>
__global__ void sum_squares_partials_kernel(double* partials, const void* x, int64_t count) {
  double sum = 0.0;
  for (int64_t i = first_index(); i < count; i += grid_stride()) {
    sum = add_square(sum, static_cast<double>(load_stored<Dtype>(x, i)));
  }
  const double total = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// One pass, as the CPU's: scale in place, then square the stored (scaled) value.
__global__ void unscale_partials_kernel(double* partials, float* gradient, int64_t count,
                                        float unscale) {
  double sum = 0.0;
  for (int64_t i = first_index(); i < count; i += grid_stride()) {
    const float g = gradient[i] * unscale;
    gradient[i] = g;
    sum = add_square(sum, static_cast<double>(g));
  }
  const double total = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// One block: Σ partials[0, kReductionBlocks) in a fixed order.
__device__ double sum_partials(const double* partials) {
  double sum = 0.0;
  for (int i = threadIdx.x; i < kReductionBlocks; i += blockDim.x)
    sum = __dadd_rn(sum, partials[i]);
  return block_sum(sum);
}

__global__ void write_sum_kernel(double* result, const double* partials) {
  const double total = sum_partials(partials);
  if (threadIdx.x == 0) *result = total;
}

// accumulate_gradient_statistics of kernels/cpu/reduce.cc on the device.
__global__ void accumulate_statistics_kernel(GradientStatistics* statistics, const double* partials,
                                             int64_t tensor_index) {
  const double total = sum_partials(partials);
  if (threadIdx.x != 0) return;
  if (!isfinite(total) && statistics->first_non_finite < 0) {
    statistics->first_non_finite = tensor_index;
  }
  statistics->sum_squares += total;
}

template <DType Dtype>
void launch_sum_squares_partials(double* partials, const void* x, int64_t count,
                                 cudaStream_t stream) {
  sum_squares_partials_kernel<Dtype>
      <<<kReductionBlocks, kThreadsPerBlock, 0, stream>>>(partials, x, count);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void convert_to_f32(float* out, const void* in, DType dtype, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  if (dtype == DType::kF32) {
    LOMO_CUDA_CHECK(cudaMemcpyAsync(out, in, static_cast<size_t>(count) * sizeof(float),
                                    cudaMemcpyDeviceToDevice, stream));
    return;
  }
  with_stored_dtype(dtype, [&](auto stored) {
    convert_kernel<decltype(stored)::value>
        <<<blocks_for(count), kThreadsPerBlock, 0, stream>>>(out, in, count);
  });
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void convert_from_f32(void* out, DType dtype, const float* in, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  if (dtype == DType::kF32) {
    LOMO_CUDA_CHECK(cudaMemcpyAsync(out, in, static_cast<size_t>(count) * sizeof(float),
                                    cudaMemcpyDeviceToDevice, stream));
    return;
  }
  uint16_t* narrow = static_cast<uint16_t*>(out);
  if (dtype == DType::kBF16) {
    narrow_kernel<DType::kBF16>
        <<<blocks_for(count), kThreadsPerBlock, 0, stream>>>(narrow, in, count);
  } else {
    narrow_kernel<DType::kF16>
        <<<blocks_for(count), kThreadsPerBlock, 0, stream>>>(narrow, in, count);
  }
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void sum_squares(double* result, const void* x, DType dtype, int64_t count, double* partials,
                 cudaStream_t stream) {
  if (count <= 0) {
    LOMO_CUDA_CHECK(cudaMemsetAsync(result, 0, sizeof(double), stream));  // +0.0
    return;
  }
  with_stored_dtype(dtype, [&](auto stored) {
    launch_sum_squares_partials<decltype(stored)::value>(partials, x, count, stream);
  });
  write_sum_kernel<<<1, kThreadsPerBlock, 0, stream>>>(result, partials);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void round_gradient_to_dtype(float* gradient, int64_t count, DType dtype, cudaStream_t stream) {
  if (count <= 0 || dtype == DType::kF32) return;
  const unsigned blocks = blocks_for(count);
  if (dtype == DType::kBF16) {
    round_trip_kernel<DType::kBF16><<<blocks, kThreadsPerBlock, 0, stream>>>(gradient, count);
  } else {
    round_trip_kernel<DType::kF16><<<blocks, kThreadsPerBlock, 0, stream>>>(gradient, count);
  }
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void unscale_gradient(float* gradient, int64_t count, float unscale, int64_t tensor_index,
                      GradientStatistics* statistics, double* partials, cudaStream_t stream) {
  // An empty tensor adds 0, which is finite: nothing changes (as on the CPU).
  if (count <= 0) return;
  unscale_partials_kernel<<<kReductionBlocks, kThreadsPerBlock, 0, stream>>>(partials, gradient,
                                                                             count, unscale);
  LOMO_CUDA_CHECK(cudaGetLastError());
  accumulate_statistics_kernel<<<1, kThreadsPerBlock, 0, stream>>>(statistics, partials,
                                                                   tensor_index);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

void clip_gradient(float* gradient, int64_t count, bool clip_by_value, float clip_value,
                   float coefficient, cudaStream_t stream) {
  if (count <= 0) return;
  const unsigned blocks = blocks_for(count);
  if (clip_by_value) {
    clip_by_value_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(gradient, count, clip_value,
                                                                  coefficient);
  } else if (coefficient != 1.0f) {
    scale_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(gradient, count, coefficient);
  } else {
    return;
  }
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lomo::cuda
