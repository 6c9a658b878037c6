// Which GEMM kernels this processor gets, and the bf16-input product used in the bf16 matmul mode.
// Every CPU product goes through oneDNN, which picks its kernels at run time from cpuid (SSE4.1,
// AVX2, AVX-512, AVX512-BF16, AMX), so one binary is right on every x86-64; a BLAS whose build-time
// core table lags the hardware (Debian's OpenBLAS 0.3.21 runs Sapphire Rapids as "Prescott") is
// not.
#pragma once

#include <cstdint>
#include <string>

namespace lomo::cpu {

// What the processor offers, read from cpuid/xgetbv here, independently of any library, so a test
// can hold the library's choice against it.
struct CpuFeatures {
  bool avx2 = false;
  bool avx512f = false;
  bool avx512_bf16 = false;
  bool amx_bf16 = false;
};
CpuFeatures cpu_features();

// The kernel class oneDNN selected for this process ("avx512_core_bf16", "avx2", "sse41", ...).
// `generic` is true for SSE-only or reference kernels.
struct GemmKernel {
  std::string library;  // "oneDNN 2.6.3"
  std::string isa;
  bool generic = true;
  bool bf16 = false;  // bf16 inputs run on AVX512-BF16 or AMX instructions
};
GemmKernel gemm_kernel();

// True when matmuls may take bf16 inputs on native instructions (AVX512-BF16 or AMX-BF16).
bool bf16_matmul_supported();

// The oneDNN implementation a bf16 product of this shape runs on, e.g. "brg:avx512_core_bf16".
std::string bf16_matmul_implementation(int64_t m, int64_t n, int64_t k);

// C = op(A)·op(B) (or C += when `accumulate`), row-major, A and B rounded to bf16 (nearest even)
// before the product, fp32 accumulation and fp32 C. Same argument conventions as gemm().
void gemm_bf16(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, const float* a,
               int64_t lda, const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc);

}  // namespace lomo::cpu
