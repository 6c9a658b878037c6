// Forward+backward throughput and peak memory of the CPU engine on the reference config, read
// against this machine's own sgemm rate. Prints figures; asserts nothing (see docs/PERFORMANCE.md).
//
//   engine_bench [--steps N] [--batch B] [--seq T] [--layers L] [--checkpointing off|on|both]
//                [--precision fp32|bf16] [--profile-ops on]
//   --steps 0 prints the GEMM rates only (bench/side_by_side.py reads its rooflines from them).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/profiling_backend.h"
#include "bench/reference_workload.h"
#include "kernels/backend.h"
#include "kernels/cpu/gemm_dispatch.h"
#include "worker/engine/llama_model.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Best-of-several GFLOP/s of y = x·Wᵀ at one shape, all threads.
double sgemm_gflops(int64_t m, int64_t n, int64_t k) {
  std::vector<float> x(static_cast<size_t>(m * k), 0.5f), w(static_cast<size_t>(n * k), 0.25f),
      y(static_cast<size_t>(m * n));
  lomo::Backend& backend = lomo::backend_for(lomo::Device::cpu());
  double best = 0.0;
  for (int repeat = 0; repeat < 5; ++repeat) {
    const auto start = Clock::now();
    backend.matmul_forward(y.data(), x.data(), w.data(), m, n, k, /*accumulate=*/false);
    best = std::max(best, 2.0 * m * n * k / seconds_since(start) / 1e9);
  }
  return best;
}

// Consumes each gradient the way a norm-only pass would, so no work is optimised away.
class SquaredNormSink : public lomo::GradientSink {
 public:
  void consume(lomo::Parameter& parameter, const lomo::TensorView& view) override {
    const float* gradient = view.f32();
    double sum = 0.0;
    const int64_t n = parameter.numel();
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(gradient[i]) * gradient[i];
    total += sum;
  }
  double total = 0.0;
};

struct Args {
  std::string checkpointing = "both";  // off | on | both
  std::string precision = "fp32";      // fp32 | bf16 (Backend::MatmulPrecision of the model step)
  int steps = 3;
  int64_t batch = 4, seq = 256, layers = 8;
  bool profile_ops = false;  // --profile-ops on: the step's time by op family
};

Args parse_args(int argc, char** argv) {
  Args args;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const long value = std::strtol(argv[i + 1], nullptr, 10);
    if (flag == "--checkpointing")
      args.checkpointing = argv[i + 1];
    else if (flag == "--precision")
      args.precision = argv[i + 1];
    else if (flag == "--steps")
      args.steps = static_cast<int>(value);
    else if (flag == "--batch")
      args.batch = value;
    else if (flag == "--seq")
      args.seq = value;
    else if (flag == "--layers")
      args.layers = value;
    else if (flag == "--profile-ops")
      args.profile_ops = std::string(argv[i + 1]) == "on";
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      std::exit(2);
    }
  }
  return args;
}

// What the CPU offers (cpuid) and which kernel class the GEMM library chose for it.
void print_gemm_kernel() {
  const lomo::cpu::CpuFeatures f = lomo::cpu::cpu_features();
  const lomo::cpu::GemmKernel k = lomo::cpu::gemm_kernel();
  std::printf("cpu: avx2 %d, avx512f %d, avx512_bf16 %d, amx_bf16 %d\n", f.avx2, f.avx512f,
              f.avx512_bf16, f.amx_bf16);
  std::printf("gemm: %s, kernel isa %s%s, bf16 %s\n", k.library.c_str(), k.isa.c_str(),
              k.generic ? " (GENERIC)" : "", lomo::cpu::bf16_matmul_supported() ? "yes" : "no");
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  const lomo::LlamaConfig config = lomo::bench::reference_config(args.layers);

  std::printf("threads: %d\n", omp_get_max_threads());
  print_gemm_kernel();
  const double square = sgemm_gflops(2048, 2048, 2048);
  std::printf("sgemm 2048^3: %.1f GFLOP/s  (roofline used below)\n", square);
  const int64_t rows = args.batch * args.seq;
  std::printf("sgemm model shapes: qkvo %.1f, mlp-up %.1f, mlp-down %.1f, lm-head %.1f GFLOP/s\n",
              sgemm_gflops(rows, 512, 512), sgemm_gflops(rows, 1376, 512),
              sgemm_gflops(rows, 512, 1376), sgemm_gflops(rows, 32000, 512));
  if (args.precision == "bf16") {
    lomo::backend_for(lomo::Device::cpu())
        .set_matmul_precision(lomo::Backend::MatmulPrecision::kBf16);
    std::printf(
        "bf16 matmul (%s): 2048^3 %.1f GFLOP/s; model shapes: qkvo %.1f, mlp-up %.1f, "
        "mlp-down %.1f, lm-head %.1f GFLOP/s\n",
        lomo::cpu::bf16_matmul_implementation(rows, 512, 512).c_str(),
        sgemm_gflops(2048, 2048, 2048), sgemm_gflops(rows, 512, 512), sgemm_gflops(rows, 1376, 512),
        sgemm_gflops(rows, 512, 1376), sgemm_gflops(rows, 32000, 512));
  } else if (args.precision != "fp32") {
    std::fprintf(stderr, "--precision: expected fp32 or bf16, got %s\n", args.precision.c_str());
    return 2;
  }
  std::printf("model step matmul precision: %s (rooflines below are fp32 sgemm)\n",
              args.precision.c_str());
  if (args.steps == 0) return 0;

  for (bool checkpointing : {false, true}) {
    if (args.checkpointing != "both" && (args.checkpointing == "on") != checkpointing) continue;
    lomo::MemoryAccountant accountant;
    lomo::LlamaWeights weights(config, lomo::DType::kF32, accountant);
    weights.init_random(1, 0.02f);
    // With --profile-ops on, every model call is timed by op family (the CPU backend has nothing
    // to synchronise, so the split costs only the clock reads).
    lomo::Backend& backend = lomo::backend_for(lomo::Device::cpu());
    lomo::ProfilingBackend profiler(backend);
    lomo::LlamaModel model(args.profile_ops ? static_cast<lomo::Backend&>(profiler) : backend,
                           weights, accountant, {checkpointing});
    const lomo::TokenBatch batch =
        lomo::bench::random_batch(args.batch, args.seq, config.vocab_size);

    SquaredNormSink sink;
    model.forward(batch);  // warm-up: first touch of every buffer
    model.backward(sink);
    profiler.reset();
    double forward_seconds = 0.0, total_seconds = 0.0, loss = 0.0;
    for (int step = 0; step < args.steps; ++step) {
      const auto start = Clock::now();
      loss = model.forward(batch).loss;
      forward_seconds += seconds_since(start);
      model.backward(sink);
      total_seconds += seconds_since(start);
    }
    const double per_step = total_seconds / args.steps;
    const double params = static_cast<double>(weights.parameter_count());
    const double attention_flops = 12.0 * args.layers * args.batch * config.num_attention_heads *
                                   static_cast<double>(args.seq * args.seq) * config.head_dim;
    const double roofline_flops = 6.0 * params * rows + attention_flops;
    const double achieved = roofline_flops / per_step / 1e9;
    std::printf("\n== forward+backward, activation checkpointing %s ==\n",
                checkpointing ? "ON" : "OFF");
    std::printf("params %.2fM, batch %lld x %lld, loss %.4f\n", params / 1e6,
                static_cast<long long>(args.batch), static_cast<long long>(args.seq), loss);
    std::printf("step %.3f s (forward %.3f s), %.0f tokens/s\n", per_step,
                forward_seconds / args.steps, rows / per_step);
    std::printf(
        "model FLOPs/step %.1f G (6*P*tokens %.1f G + attention %.1f G): %.1f GFLOP/s = "
        "%.1f%% of sgemm roofline\n",
        roofline_flops / 1e9, 6.0 * params * rows / 1e9, attention_flops / 1e9, achieved,
        100.0 * achieved / square);
    // The formula above counts the input embedding as matmul work (6·P includes it) although a
    // lookup does none; the executed matmul FLOPs leave it out and read as BLAS efficiency.
    const double embedding_params = static_cast<double>(weights.embed_tokens().numel());
    const double executed_flops = 6.0 * (params - embedding_params) * rows + attention_flops;
    std::printf(
        "executed matmul FLOPs/step %.1f G (embedding excluded): %.1f GFLOP/s = %.1f%% of "
        "sgemm\n",
        executed_flops / 1e9, executed_flops / per_step / 1e9,
        100.0 * executed_flops / per_step / 1e9 / square);
    std::printf("peak memory by kind:\n%s", accountant.report().to_string().c_str());
    if (args.profile_ops) profiler.print(total_seconds);
  }
  return 0;
}
