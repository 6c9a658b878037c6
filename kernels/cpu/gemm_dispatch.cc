#include "kernels/cpu/gemm_dispatch.h"

#include <cpuid.h>

#include <oneapi/dnnl/dnnl.hpp>
#include <stdexcept>
#include <vector>

#include "kernels/dtype.h"

namespace lomo::cpu {
namespace {

bool bit(uint32_t value, int index) { return ((value >> index) & 1u) != 0; }

// XCR0: which register states the OS saves. A CPU flag without OS support is unusable.
uint64_t xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

std::string isa_name(dnnl_cpu_isa_t isa) {
  switch (isa) {
    case dnnl_cpu_isa_sse41:
      return "sse41";
    case dnnl_cpu_isa_avx:
      return "avx";
    case dnnl_cpu_isa_avx2:
      return "avx2";
    case dnnl_cpu_isa_avx2_vnni:
      return "avx2_vnni";
    case dnnl_cpu_isa_avx512_mic:
      return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops:
      return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core:
      return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx:
      return "avx512_core_amx";
    default:
      return "unknown(" + std::to_string(static_cast<int>(isa)) + ")";
  }
}

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Dense bf16 copy of a stored rows×cols matrix with leading dimension `ld`.
void round_to_bf16(std::vector<uint16_t>& out, const float* in, int64_t rows, int64_t cols,
                   int64_t ld) {
  out.resize(static_cast<size_t>(rows * cols));
  uint16_t* o = out.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = float_to_bf16(in[r * ld + c]);
  }
}

// The logical rows×cols operand over a dense copy stored transposed or not.
dnnl::memory::desc operand_desc(dnnl::memory::data_type type, int64_t rows, int64_t cols,
                                bool transposed) {
  const dnnl::memory::dims strides =
      transposed ? dnnl::memory::dims{1, rows} : dnnl::memory::dims{cols, 1};
  return dnnl::memory::desc({rows, cols}, type, strides);
}

dnnl::matmul::primitive_desc bf16_matmul(bool transpose_a, bool transpose_b, int64_t m, int64_t n,
                                         int64_t k, int64_t ldc, bool accumulate) {
  using dt = dnnl::memory::data_type;
  dnnl::primitive_attr attr;
  if (accumulate) {
    dnnl::post_ops ops;
    ops.append_sum(1.0f);
    attr.set_post_ops(ops);
  }
  const dnnl::matmul::desc desc(operand_desc(dt::bf16, m, k, transpose_a),
                                operand_desc(dt::bf16, k, n, transpose_b),
                                dnnl::memory::desc({m, n}, dt::f32, dnnl::memory::dims{ldc, 1}));
  return dnnl::matmul::primitive_desc(desc, attr, cpu_engine());
}

}  // namespace

CpuFeatures cpu_features() {
  CpuFeatures f;
  uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0 || !bit(ecx, 27)) return f;  // no OSXSAVE
  const uint64_t xcr = xcr0();
  const bool ymm = (xcr & 0x6) == 0x6, zmm = (xcr & 0xe6) == 0xe6;
  const bool tiles = (xcr & 0x60000) == 0x60000;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return f;
  f.avx2 = ymm && bit(ebx, 5);
  f.avx512f = zmm && bit(ebx, 16);
  f.amx_bf16 = tiles && bit(edx, 22);
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0) f.avx512_bf16 = zmm && bit(eax, 5);
  return f;
}

GemmKernel gemm_kernel() {
  const dnnl_version_t* v = dnnl_version();
  const dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
  GemmKernel k;
  k.library = "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
              std::to_string(v->patch);
  k.isa = isa_name(isa);
  // oneDNN's ISA values are bit masks: every AVX2-or-better ISA contains the AVX2 bits.
  k.generic = (isa & dnnl_cpu_isa_avx2) != dnnl_cpu_isa_avx2;
  k.bf16 = (isa & dnnl_cpu_isa_avx512_core_bf16) == dnnl_cpu_isa_avx512_core_bf16;
  return k;
}

bool bf16_matmul_supported() {
  const CpuFeatures f = cpu_features();
  return (f.avx512_bf16 || f.amx_bf16) && gemm_kernel().bf16;
}

std::string bf16_matmul_implementation(int64_t m, int64_t n, int64_t k) {
  return bf16_matmul(false, true, m, n, k, n, false).impl_info_str();
}

void gemm_bf16(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, const float* a,
               int64_t lda, const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  // Per thread, so concurrent callers do not share scratch; reused across calls (no allocation in
  // the steady state). Not in the MemoryAccountant: at most half the fp32 operands' bytes.
  thread_local std::vector<uint16_t> a16, b16;
  round_to_bf16(a16, a, transpose_a ? k : m, transpose_a ? m : k, lda);
  round_to_bf16(b16, b, transpose_b ? n : k, transpose_b ? k : n, ldb);
  try {
    // oneDNN's primitive cache makes repeated shapes cheap to create.
    const auto pd = bf16_matmul(transpose_a, transpose_b, m, n, k, ldc, accumulate);
    dnnl::memory A(pd.src_desc(), cpu_engine(), a16.data());
    dnnl::memory B(pd.weights_desc(), cpu_engine(), b16.data());
    dnnl::memory C(pd.dst_desc(), cpu_engine(), c);
    dnnl::stream stream(cpu_engine());
    dnnl::matmul(pd).execute(stream, {{DNNL_ARG_SRC, A}, {DNNL_ARG_WEIGHTS, B}, {DNNL_ARG_DST, C}});
    stream.wait();
  } catch (const dnnl::error& e) {
    throw std::runtime_error("bf16 matmul " + std::to_string(m) + "x" + std::to_string(n) + "x" +
                             std::to_string(k) + " failed in oneDNN: " + e.what());
  }
}

}  // namespace lomo::cpu
