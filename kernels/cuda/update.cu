// The update rules on the GPU, element for element the CPU kernels (kernels/cpu/*_update.cc and
// write_back.h): the same fp32 operations in the same order, the same storage conversions
// (kernels/dtype.h) and the same stochastic-rounding hash, so bf16 parameters round identically on
// both backends. Where g++ contracts a CPU expression into a fused multiply-add, the code here
// writes that FMA out (and every other product with __fmul_rn), so nvcc's own contraction cannot
// pick a different one.
//
// AdaLomo's reductions are deterministic without atomics: moments by a block per row and a thread
// per column, the sums of squares by kReductionBlocks fixed blocks into `partials`, combined in a
// fixed order by one block. Scalars between kernels (the row mean, the step) stay in `partials`;
// the host never waits. Every kernel returns at once when `skip` records a non-finite gradient.
#include <algorithm>

#include "kernels/counter_hash.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/update.h"

namespace lomo::cuda {
namespace {

// Block-per-row kernels: grid-stride over rows beyond this many blocks.
constexpr int64_t kMaxRowBlocks = 65535 * 32;
// The sums of squares of AdaLomo: the update's in partials[0, half), the parameter's in
// partials[half, 2·half).
constexpr int kSquaresBlocks = kReductionBlocks / 2;

__device__ bool skipped(const GradientStatistics* skip) {
  return skip != nullptr && skip->first_non_finite >= 0;
}

__device__ int64_t first_index() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
}
__device__ int64_t grid_stride() { return gridDim.x * static_cast<int64_t>(blockDim.x); }

// value·keep − subtrahend as g++ builds `value * keep - a * b` on the CPU: the first product fused.
__device__ float keep_minus(float value, float keep, float subtrahend) {
  return __fmaf_rn(value, keep, -subtrahend);
}

// Sum over a block of kThreadsPerBlock threads in a fixed tree; every thread gets the total. All
// threads of the block must call it.
__device__ double block_sum(double value) {
  __shared__ double warp_sums[kThreadsPerBlock / 32];
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  double total = 0.0;
  for (int warp = 0; warp < kThreadsPerBlock / 32; ++warp) total += warp_sums[warp];
  __syncthreads();  // warp_sums is reused by the next call
  return total;
}

// A parameter tensor as stored, with write_back.h's rounding on store.
struct ParameterStorage {
  void* data;
  DType dtype;
  bool stochastic;
  uint64_t rounding_stream;  // the tensor's stochastic-rounding stream (write_back.h)

  __device__ float load(int64_t i) const {
    switch (dtype) {
      case DType::kF32:
        return static_cast<const float*>(data)[i];
      case DType::kBF16:
        return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
      case DType::kF16:
        return fp16_to_float(static_cast<const uint16_t*>(data)[i]);
    }
    return 0.0f;
  }

  __device__ void store(int64_t i, float value) const {
    switch (dtype) {
      case DType::kF32:
        static_cast<float*>(data)[i] = value;
        return;
      case DType::kBF16:
        static_cast<uint16_t*>(data)[i] =
            stochastic ? float_to_bf16_stochastic(
                             value, mix_bits(rounding_stream + static_cast<uint64_t>(i)))
                       : float_to_bf16(value);
        return;
      case DType::kF16:
        static_cast<uint16_t*>(data)[i] = float_to_fp16(value);
        return;
    }
  }
};

ParameterStorage storage_for(void* parameter, DType dtype, const WriteBack& write_back) {
  const uint64_t stream =
      mix_bits(write_back.seed ^ mix_bits(static_cast<uint64_t>(write_back.step)) ^
               mix_bits(~static_cast<uint64_t>(write_back.tensor_index)));
  return ParameterStorage{parameter, dtype, write_back.stochastic, stream};
}

// p ← rule(i, p) for every element: write_back.h's update_parameter.
template <typename Rule>
__global__ void update_parameter_kernel(ParameterStorage parameter, int64_t count, Rule rule,
                                        const GradientStatistics* skip) {
  if (skipped(skip)) return;
  for (int64_t i = first_index(); i < count; i += grid_stride())
    parameter.store(i, rule(i, parameter.load(i)));
}

template <typename Rule>
void launch_update(ParameterStorage parameter, int64_t count, Rule rule,
                   const GradientStatistics* skip, cudaStream_t stream) {
  update_parameter_kernel<<<blocks_for(count), kThreadsPerBlock, 0, stream>>>(parameter, count,
                                                                              rule, skip);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

// ---- LOMO / SGD --------------------------------------------------------------------------------

struct SgdRule {
  const float* gradient;
  float keep, step;
  __device__ float operator()(int64_t i, float value) const {
    return keep_minus(value, keep, __fmul_rn(step, gradient[i]));
  }
};

// ---- AdamW -------------------------------------------------------------------------------------

struct AdamWRule {
  const float* g;
  float* m;
  float* v;
  AdamWUpdate u;
  __device__ float operator()(int64_t j, float value) const {
    const float gj = g[j];
    const float m_new = __fmaf_rn(u.beta1, m[j], __fmul_rn(1.0f - u.beta1, gj));
    const float v_new = __fmaf_rn(u.beta2, v[j], __fmul_rn(__fmul_rn(1.0f - u.beta2, gj), gj));
    m[j] = m_new;
    v[j] = v_new;
    const float denominator = __fadd_rn(__fsqrt_rn(__fdiv_rn(v_new, u.correction2)), u.eps);
    return keep_minus(value, u.keep,
                      __fdiv_rn(__fmul_rn(u.step, __fdiv_rn(m_new, u.correction1)), denominator));
  }
};

// ---- AdaLomo -----------------------------------------------------------------------------------

// β·moment + (1−β)·mean, in double as on the CPU, rounded to the fp32 moment.
__device__ float decayed_average(float moment, double mean_term, double beta) {
  return static_cast<float>(__fma_rn(beta, static_cast<double>(moment), mean_term));
}

// g² + ε₁ in double.
__device__ double square_plus(float g, double eps1) {
  const double x = g;
  return __fma_rn(x, x, eps1);
}

// Vector: v ← β·v + (1−β)·(g² + ε₁), g ← g / sqrt(v).
__global__ void full_moment_kernel(int64_t count, float* v, float* g, double beta, double eps1,
                                   const GradientStatistics* skip) {
  if (skipped(skip)) return;
  for (int64_t i = first_index(); i < count; i += grid_stride()) {
    const float moment = decayed_average(v[i], (1.0 - beta) * square_plus(g[i], eps1), beta);
    v[i] = moment;
    g[i] = static_cast<float>(g[i] / sqrt(static_cast<double>(moment)));
  }
}

// Matrix rows, a block per row: row[r] ← β·row[r] + (1−β)·mean_c(g² + ε₁).
__global__ void row_moment_kernel(int64_t rows, int64_t cols, float* row, const float* g,
                                  double beta, double eps1, const GradientStatistics* skip) {
  if (skipped(skip)) return;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* gr = g + r * cols;
    double sum = 0.0;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) sum += square_plus(gr[c], eps1);
    sum = block_sum(sum);
    if (threadIdx.x == 0) row[r] = decayed_average(row[r], (1.0 - beta) * sum / cols, beta);
  }
}

// Matrix columns, a thread per column summing the rows in order (deterministic, coalesced).
__global__ void column_moment_kernel(int64_t rows, int64_t cols, float* col, const float* g,
                                     double beta, double eps1, const GradientStatistics* skip) {
  if (skipped(skip)) return;
  for (int64_t c = first_index(); c < cols; c += grid_stride()) {
    double sum = 0.0;
    for (int64_t r = 0; r < rows; ++r) sum += square_plus(g[r * cols + c], eps1);
    col[c] = decayed_average(col[c], (1.0 - beta) * sum / rows, beta);
  }
}

// partials[0] = mean of the updated row moments (one block).
__global__ void row_mean_kernel(int64_t rows, const float* row, double* partials,
                                const GradientStatistics* skip) {
  if (skipped(skip)) return;
  double sum = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) sum += row[r];
  sum = block_sum(sum);
  if (threadIdx.x == 0) partials[0] = sum / static_cast<double>(rows);
}

// g ← g / sqrt(v̂), v̂[r][c] = row[r] / mean(row) · col[c], as the CPU factors it; a block per row.
__global__ void factored_scale_kernel(int64_t rows, int64_t cols, const float* row,
                                      const float* col, float* g, const double* partials,
                                      const GradientStatistics* skip) {
  if (skipped(skip)) return;
  const double row_mean = partials[0];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const double row_factor = 1.0 / sqrt(row[r] / row_mean);
    float* gr = g + r * cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      gr[c] = static_cast<float>(gr[c] * row_factor / sqrt(static_cast<double>(col[c])));
    }
  }
}

// Per-block Σg² into partials[block] and Σθ² into partials[kSquaresBlocks + block], in double.
__global__ void squares_kernel(int64_t count, const float* g, ParameterStorage parameter,
                               double* partials, const GradientStatistics* skip) {
  if (skipped(skip)) return;
  double update_sum = 0.0, parameter_sum = 0.0;
  for (int64_t i = first_index(); i < count; i += grid_stride()) {
    const double u = g[i], p = parameter.load(i);
    update_sum += u * u;
    parameter_sum += p * p;
  }
  update_sum = block_sum(update_sum);
  parameter_sum = block_sum(parameter_sum);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = update_sum;
    partials[kSquaresBlocks + blockIdx.x] = parameter_sum;
  }
}

// One block: combines the partial sums in a fixed order and leaves the update's scalars in
// partials[0] (step) and partials[1] (keep), each an fp32 value, as the CPU computes them.
__global__ void adalomo_scalars_kernel(int64_t count, AdaLomoUpdate u, double* partials,
                                       const GradientStatistics* skip) {
  if (skipped(skip)) return;
  double update_sum = 0.0, parameter_sum = 0.0;
  for (int b = threadIdx.x; b < kSquaresBlocks; b += blockDim.x) {
    update_sum += partials[b];
    parameter_sum += partials[kSquaresBlocks + b];
  }
  // block_sum synchronises: every read of partials is done before thread 0 overwrites them.
  update_sum = block_sum(update_sum);
  parameter_sum = block_sum(parameter_sum);
  if (threadIdx.x != 0) return;
  const double n = static_cast<double>(count);
  // Update normalisation U ← U / max(1, RMS(U)/d); std::max's NaN behaviour kept (NaN → 1).
  const double ratio = sqrt(update_sum / n) / u.clip_threshold;
  const double scale = 1.0 / (1.0 < ratio ? ratio : 1.0);
  // Relative step α = lr·max(ε₂, RMS(θ)), RMS of the parameter before this update.
  const double parameter_rms = sqrt(parameter_sum / n);
  const double alpha = u.lr * (u.eps2 < parameter_rms ? parameter_rms : u.eps2);
  partials[0] = static_cast<float>(alpha * scale);
  partials[1] =
      u.weight_decay > 0.0 ? static_cast<float>(__fma_rn(-alpha, u.weight_decay, 1.0)) : 1.0f;
}

struct AdaLomoRule {
  const float* g;
  const double* scalars;  // partials[0] = step, partials[1] = keep
  __device__ float operator()(int64_t i, float value) const {
    const float step = static_cast<float>(scalars[0]), keep = static_cast<float>(scalars[1]);
    return keep_minus(value, keep, __fmul_rn(step, g[i]));
  }
};

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>(rows, kMaxRowBlocks));
}

void factored_moment(int64_t rows, int64_t cols, float* row, float* col, float* g, double beta,
                     double eps1, const GradientStatistics* skip, double* partials,
                     cudaStream_t stream) {
  row_moment_kernel<<<row_blocks(rows), kThreadsPerBlock, 0, stream>>>(rows, cols, row, g, beta,
                                                                       eps1, skip);
  LOMO_CUDA_CHECK(cudaGetLastError());
  column_moment_kernel<<<blocks_for(cols), kThreadsPerBlock, 0, stream>>>(rows, cols, col, g, beta,
                                                                          eps1, skip);
  LOMO_CUDA_CHECK(cudaGetLastError());
  row_mean_kernel<<<1, kThreadsPerBlock, 0, stream>>>(rows, row, partials, skip);
  LOMO_CUDA_CHECK(cudaGetLastError());
  factored_scale_kernel<<<row_blocks(rows), kThreadsPerBlock, 0, stream>>>(rows, cols, row, col, g,
                                                                           partials, skip);
  LOMO_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void lomo_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                 const SgdUpdate& update, const WriteBack& write_back,
                 const GradientStatistics* skip, cudaStream_t stream) {
  if (count <= 0) return;
  launch_update(storage_for(parameter, dtype, write_back), count,
                SgdRule{gradient, update.keep, update.step}, skip, stream);
}

void adalomo_update(void* parameter, DType dtype, int64_t rows, int64_t cols, float* gradient,
                    float* exp_avg_sq_row, float* exp_avg_sq_col, float* exp_avg_sq,
                    const AdaLomoUpdate& update, const WriteBack& write_back,
                    const GradientStatistics* skip, double* partials, cudaStream_t stream) {
  const int64_t count = cols > 0 ? rows * cols : rows;
  if (count <= 0) return;
  if (cols > 0) {
    factored_moment(rows, cols, exp_avg_sq_row, exp_avg_sq_col, gradient, update.beta, update.eps1,
                    skip, partials, stream);
  } else {
    full_moment_kernel<<<blocks_for(count), kThreadsPerBlock, 0, stream>>>(
        count, exp_avg_sq, gradient, update.beta, update.eps1, skip);
    LOMO_CUDA_CHECK(cudaGetLastError());
  }
  const ParameterStorage storage = storage_for(parameter, dtype, write_back);
  squares_kernel<<<kSquaresBlocks, kThreadsPerBlock, 0, stream>>>(count, gradient, storage,
                                                                  partials, skip);
  LOMO_CUDA_CHECK(cudaGetLastError());
  adalomo_scalars_kernel<<<1, kThreadsPerBlock, 0, stream>>>(count, update, partials, skip);
  LOMO_CUDA_CHECK(cudaGetLastError());
  launch_update(storage, count, AdaLomoRule{gradient, partials}, skip, stream);
}

void adamw_update(void* parameter, DType dtype, int64_t count, const float* gradient,
                  float* exp_avg, float* exp_avg_sq, const AdamWUpdate& update,
                  const WriteBack& write_back, const GradientStatistics* skip,
                  cudaStream_t stream) {
  if (count <= 0) return;
  launch_update(storage_for(parameter, dtype, write_back), count,
                AdamWRule{gradient, exp_avg, exp_avg_sq, update}, skip, stream);
}

}  // namespace lomo::cuda
