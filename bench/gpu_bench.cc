// One LOMO-family training step on a GPU at real LLaMA shapes with random weights: tokens/s, MFU,
// peak device memory by kind (the accountant) next to what the CUDA memory pool really reserved,
// and, with --profile-ops, the step's time split by op family. Prints figures; asserts nothing
// (docs/PERFORMANCE.md records them with the card's name).
//
//   gpu_bench [--model 7b|13b|30b|1b|tiny] [--seq T] [--batch B] [--steps N]
//             [--optimizer lomo|lomo-clip|adalomo] [--checkpointing on|off] [--dtype
//             bf16|fp16|fp32]
//             [--device cuda:0|cpu] [--matmul fp32|tf32|bf16] [--profile-ops]
//   --matmul defaults to what the trainer's precision.matmul auto picks: fp32 for fp32 weights,
//   bf16 for bf16 weights on a GPU, TF32 otherwise.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "bench/profiling_backend.h"
#include "kernels/backend.h"
#include "kernels/counter_hash.h"
#include "worker/engine/llama_model.h"
#include "worker/engine/llama_weights.h"
#include "worker/optim/optimizer.h"

#ifdef LOMO_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_backend.h"
#endif

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

lomo::LlamaConfig model_config(const std::string& name) {
  lomo::LlamaConfig c;
  c.vocab_size = 32000;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 4096;
  auto set = [&c](int64_t hidden, int64_t inter, int64_t layers, int64_t heads) {
    c.hidden_size = hidden;
    c.intermediate_size = inter;
    c.num_hidden_layers = layers;
    c.num_attention_heads = heads;
    c.num_key_value_heads = heads;
    c.head_dim = hidden / heads;
  };
  if (name == "7b") {
    set(4096, 11008, 32, 32);
  } else if (name == "13b") {
    set(5120, 13824, 40, 40);
  } else if (name == "30b") {
    set(6656, 17920, 60, 52);
  } else if (name == "1b") {
    set(2048, 5504, 22, 16);
  } else if (name == "tiny") {  // a dry run of every code path on the CPU
    c.vocab_size = 512;
    set(128, 256, 2, 4);
  } else {
    std::fprintf(stderr, "gpu_bench: unknown --model %s (7b, 13b, 30b, 1b, tiny)\n", name.c_str());
    std::exit(2);
  }
  return c;
}

// Weights of a trained model's scale without drawing billions of normals: a 4M-value chunk of
// N(0, 0.02) in the storage dtype, copied over every matrix; norm weights 1.
void fill_weights(lomo::LlamaWeights& weights) {
  constexpr size_t kChunk = size_t{1} << 22;
  lomo::SplitMix64 random(1);
  std::vector<float> values(kChunk), ones(kChunk, 1.0f);
  for (size_t i = 0; i < kChunk; i += 2) {
    const double u1 = (static_cast<double>(random.next() >> 11) + 1.0) / 9007199254740993.0;
    const double u2 = static_cast<double>(random.next() >> 11) / 9007199254740992.0;
    const double r = std::sqrt(-2.0 * std::log(u1)) * 0.02;
    values[i] = static_cast<float>(r * std::cos(2.0 * M_PI * u2));
    values[i + 1] = static_cast<float>(r * std::sin(2.0 * M_PI * u2));
  }
  const lomo::DType dtype = weights.storage_dtype();
  const size_t element = lomo::dtype_size(dtype);
  std::vector<char> stored(kChunk * element), stored_ones(kChunk * element);
  lomo::convert_from_float(dtype, values.data(), stored.data(), kChunk);
  lomo::convert_from_float(dtype, ones.data(), stored_ones.data(), kChunk);
  for (lomo::Parameter& p : weights.parameters()) {
    lomo::Backend& backend = lomo::backend_for(p.storage.device());
    const std::vector<char>& source = p.is_norm_weight ? stored_ones : stored;
    for (size_t first = 0; first < p.size_bytes(); first += source.size()) {
      const size_t bytes = std::min(source.size(), p.size_bytes() - first);
      backend.copy_from_host(p.storage.as<char>() + first, source.data(), bytes);
    }
  }
}

lomo::TokenBatch random_batch(int64_t batch_size, int64_t seq_len, int64_t vocab, uint64_t seed) {
  lomo::TokenBatch batch;
  batch.batch_size = batch_size;
  batch.seq_len = seq_len;
  lomo::SplitMix64 random(seed);
  for (int64_t i = 0; i < batch_size * seq_len; ++i) {
    batch.input_ids.push_back(static_cast<int32_t>(random.below(static_cast<size_t>(vocab))));
    batch.targets.push_back(static_cast<int32_t>(random.below(static_cast<size_t>(vocab))));
  }
  return batch;
}

// Model FLOPs per token of one training step (forward + backward, recomputation not counted):
// 6·N for the matrices plus 12·layers·hidden·T for attention's score and value products (PaLM's).
double flops_per_token(const lomo::LlamaConfig& c, int64_t parameters, int64_t seq_len) {
  return 6.0 * static_cast<double>(parameters) +
         12.0 * static_cast<double>(c.num_hidden_layers * c.hidden_size * seq_len);
}

// The CUDA pool's reserved-memory high-water mark on the device (what the process really held),
// or 0 without CUDA.
uint64_t pool_reserved_high(lomo::Device device) {
#ifdef LOMO_HAVE_CUDA
  if (device.is_cpu()) return 0;
  return dynamic_cast<lomo::cuda::CudaBackend&>(lomo::backend_for(device))
      .pool_reserved_high_bytes();
#endif
  (void)device;
  return 0;
}

std::string device_label(lomo::Device device) {
#ifdef LOMO_HAVE_CUDA
  if (!device.is_cpu()) {
    cudaDeviceProp properties{};
    if (cudaGetDeviceProperties(&properties, device.index) == cudaSuccess) {
      return lomo::device_name(device) + " (" + properties.name + ")";
    }
  }
#endif
  return lomo::device_name(device);
}

struct Args {
  std::string model = "7b", optimizer = "lomo", dtype = "bf16", device = "cuda:0";
  std::string matmul;  // fp32 | tf32 | bf16; default: what the trainer picks (see the top)
  int64_t seq = 1024, batch = 1;
  int steps = 3;
  bool checkpointing = true, profile_ops = false;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "gpu_bench: %s needs a value\n", flag.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (flag == "--model") {
      a.model = value();
    } else if (flag == "--seq") {
      a.seq = std::stoll(value());
    } else if (flag == "--batch") {
      a.batch = std::stoll(value());
    } else if (flag == "--steps") {
      a.steps = std::stoi(value());
    } else if (flag == "--optimizer") {
      a.optimizer = value();
    } else if (flag == "--dtype") {
      a.dtype = value();
    } else if (flag == "--device") {
      a.device = value();
    } else if (flag == "--checkpointing") {
      a.checkpointing = value() == "on";
    } else if (flag == "--matmul") {
      a.matmul = value();
      if (a.matmul != "fp32" && a.matmul != "tf32" && a.matmul != "bf16") {
        std::fprintf(stderr, "gpu_bench: --matmul takes fp32, tf32 or bf16, not %s\n",
                     a.matmul.c_str());
        std::exit(2);
      }
    } else if (flag == "--profile-ops") {
      a.profile_ops = true;
    } else {
      std::fprintf(stderr, "gpu_bench: unknown flag %s\n", flag.c_str());
      std::exit(2);
    }
  }
  return a;
}

lomo::Device parse_device(const std::string& name) {
  if (name == "cpu") return lomo::Device::cpu();
  if (name.rfind("cuda:", 0) == 0) return lomo::Device::cuda(std::stoi(name.substr(5)));
  std::fprintf(stderr, "gpu_bench: --device %s (cpu or cuda:N)\n", name.c_str());
  std::exit(2);
}

lomo::OptimizerOptions optimizer_options(const Args& a) {
  lomo::OptimizerOptions o;
  if (a.optimizer == "adalomo") {
    o.kind = lomo::OptimizerOptions::Kind::kAdaLomo;
  } else if (a.optimizer == "lomo-clip") {
    o.clip_grad_norm = 1.0;  // two backward passes: the norm first, then the update
  } else if (a.optimizer != "lomo") {
    std::fprintf(stderr, "gpu_bench: --optimizer %s (lomo, lomo-clip, adalomo)\n",
                 a.optimizer.c_str());
    std::exit(2);
  }
  if (a.dtype == "bf16") o.stochastic_rounding = true;
  if (a.dtype == "fp16") o.loss_scaling = lomo::LossScalerOptions{};
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);
  const lomo::Device device = parse_device(args.device);
  const lomo::LlamaConfig config = model_config(args.model);
  const lomo::DType dtype = lomo::dtype_from_user_string(args.dtype);
  try {
    lomo::MemoryAccountant accountant(device);
    lomo::LlamaWeights weights(config, dtype, accountant);
    fill_weights(weights);
    lomo::Backend& backend = lomo::backend_for(device);
    std::string matmul = args.matmul;
    if (matmul.empty()) {
      matmul = dtype == lomo::DType::kF32                        ? "fp32"
               : dtype == lomo::DType::kBF16 && !device.is_cpu() ? "bf16"
                                                                 : "tf32";
    }
    using Precision = lomo::Backend::MatmulPrecision;
    backend.set_matmul_precision(matmul == "bf16"   ? Precision::kBf16
                                 : matmul == "tf32" ? Precision::kTf32
                                                    : Precision::kFp32);
    lomo::ProfilingBackend profiler(backend);
    lomo::Backend& model_backend =
        args.profile_ops ? static_cast<lomo::Backend&>(profiler) : backend;
    lomo::LlamaModel model(model_backend, weights, accountant, {args.checkpointing});
    auto optimizer = lomo::make_optimizer(optimizer_options(args), weights, accountant, nullptr);

    const int64_t tokens = args.batch * args.seq;
    std::vector<double> step_seconds;
    double loss = 0.0;
    for (int step = 0; step <= args.steps; ++step) {  // step 0 warms up (allocations, cuBLAS)
      const lomo::TokenBatch batch =
          random_batch(args.batch, args.seq, config.vocab_size, static_cast<uint64_t>(step) + 1);
      if (step == 1) {
        accountant.reset_peaks();
        profiler.reset();
      }
      backend.synchronize();
      const auto start = Clock::now();
      model.forward(batch);
      const lomo::StepResult result = optimizer->step(model, step + 1, 1e-5);
      backend.synchronize();
      if (step > 0) step_seconds.push_back(seconds_since(start));
      loss = result.loss;
    }
    std::sort(step_seconds.begin(), step_seconds.end());
    const double median = step_seconds[step_seconds.size() / 2];
    const double tokens_per_second = static_cast<double>(tokens) / median;
    const double flops = flops_per_token(config, weights.parameter_count(), args.seq);
    constexpr double kH100Bf16DenseFlops = 989e12;  // H100 SXM, dense bf16 tensor cores
    const lomo::MemoryReport memory = accountant.report();
    std::printf(
        "gpu_bench device=%s model=%s params=%.3gB dtype=%s matmul=%s optimizer=%s seq=%lld "
        "batch=%lld checkpointing=%s\n",
        device_label(device).c_str(), args.model.c_str(),
        static_cast<double>(weights.parameter_count()) / 1e9, args.dtype.c_str(), matmul.c_str(),
        args.optimizer.c_str(), static_cast<long long>(args.seq),
        static_cast<long long>(args.batch), args.checkpointing ? "on" : "off");
    std::printf(
        "  step %.1f ms (median of %zu), %.0f tokens/s, %.1f TFLOP/s model, MFU %.1f%% of "
        "989 TFLOP/s bf16 dense, loss %.4f%s\n",
        median * 1e3, step_seconds.size(), tokens_per_second, tokens_per_second * flops / 1e12,
        100.0 * tokens_per_second * flops / kH100Bf16DenseFlops, loss,
        args.profile_ops ? " (profiled: synchronised per op, slower)" : "");
    std::printf("  peak by kind (accountant, GiB):");
    for (size_t k = 0; k < lomo::kMemoryKindCount; ++k) {
      const auto kind = static_cast<lomo::MemoryKind>(k);
      std::printf(" %s %.2f", std::string(lomo::memory_kind_name(kind)).c_str(),
                  static_cast<double>(memory.peak(kind)) / (1u << 30));
    }
    std::printf("; total %.2f GiB; CUDA pool reserved high %.2f GiB\n",
                static_cast<double>(memory.peak_total_bytes) / (1u << 30),
                static_cast<double>(pool_reserved_high(device)) / (1u << 30));
    if (args.profile_ops) {
      profiler.print(std::accumulate(step_seconds.begin(), step_seconds.end(), 0.0));
    }
  } catch (const std::bad_alloc& error) {  // OutOfMemoryError says what was in use
    std::printf("gpu_bench model=%s seq=%lld batch=%lld: %s\n", args.model.c_str(),
                static_cast<long long>(args.seq), static_cast<long long>(args.batch), error.what());
    return 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "gpu_bench: %s\n", error.what());
    return 1;
  }
  return 0;
}
