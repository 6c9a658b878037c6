// The analogue of the LOMO paper's Table 1 on the reference config (58M parameters, batch 4 x 256,
// fp32): peak memory by kind and tokens/s for AdamW, SGD, LOMO, LOMO with norm clipping and
// AdaLomo, with and without activation checkpointing, plus a bare forward+backward for comparison.
// Prints figures; asserts nothing (see docs/PERFORMANCE.md).
//
//   optimizer_bench [--steps N] [--layers L]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/reference_workload.h"
#include "worker/engine/llama_model.h"
#include "worker/optim/optimizer.h"

namespace {

using Clock = std::chrono::steady_clock;

class DiscardSink : public lomo::GradientSink {
 public:
  void consume(lomo::Parameter&, const lomo::TensorView& gradient) override {
    checksum += gradient.f32()[0];
  }
  float checksum = 0.0f;
};

struct Row {
  std::string name;
  bool bare = false;  // forward+backward with a sink that only reads the gradient
  lomo::OptimizerOptions options;
};

}  // namespace

int main(int argc, char** argv) {
  int steps = 3;
  int64_t layers = 8;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--steps")
      steps = std::atoi(argv[i + 1]);
    else if (flag == "--layers")
      layers = std::atoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const lomo::LlamaConfig config = lomo::bench::reference_config(layers);

  using Kind = lomo::OptimizerOptions::Kind;
  std::vector<Row> rows;
  rows.push_back({"forward+backward (no update)", true, {}});
  auto add = [&](const std::string& name, Kind kind, bool clip) {
    lomo::OptimizerOptions o;
    o.kind = kind;
    if (clip) o.clip_grad_norm = 1.0;
    rows.push_back({name, false, o});
  };
  add("AdamW", Kind::kAdamW, false);
  add("SGD", Kind::kSgd, false);
  add("LOMO", Kind::kLomo, false);
  add("LOMO + clip_grad_norm", Kind::kLomo, true);
  add("AdaLomo", Kind::kAdaLomo, false);

  const int64_t batch_size = 4, seq_len = 256, tokens = batch_size * seq_len;
  const lomo::TokenBatch batch = lomo::bench::random_batch(batch_size, seq_len, config.vocab_size);

  std::printf("%-30s %-5s %9s %9s %9s %9s %9s %9s %9s\n", "optimizer", "ckpt", "tokens/s", "params",
              "grads", "opt.state", "activ.", "workspace", "total");
  std::printf("%-30s %-5s %9s %9s %9s %9s %9s %9s %9s\n", "", "", "", "MiB", "MiB", "MiB", "MiB",
              "MiB", "MiB (peak)");
  for (bool checkpointing : {false, true}) {
    for (const Row& row : rows) {
      lomo::MemoryAccountant accountant;
      lomo::LlamaWeights weights(config, lomo::DType::kF32, accountant);
      weights.init_random(1, 0.02f);
      lomo::LlamaModel model(weights, accountant, {checkpointing});
      std::unique_ptr<lomo::Optimizer> optimizer;
      if (!row.bare) optimizer = lomo::make_optimizer(row.options, weights, accountant, nullptr);
      DiscardSink sink;
      double seconds = 0.0;
      for (int step = 0; step <= steps; ++step) {  // step 0 warms up and is not timed
        const auto start = Clock::now();
        model.forward(batch);
        if (row.bare) {
          model.backward(sink);
        } else {
          optimizer->step(model, step + 1, 1e-4);
        }
        if (step > 0) seconds += std::chrono::duration<double>(Clock::now() - start).count();
      }
      const lomo::MemoryReport m = accountant.report();
      auto mib = [&](lomo::MemoryKind kind) { return m.peak(kind) / 1048576.0; };
      std::printf("%-30s %-5s %9.0f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f\n", row.name.c_str(),
                  checkpointing ? "on" : "off", tokens * steps / seconds,
                  mib(lomo::MemoryKind::kParameters), mib(lomo::MemoryKind::kGradients),
                  mib(lomo::MemoryKind::kOptimizerState), mib(lomo::MemoryKind::kActivations),
                  mib(lomo::MemoryKind::kWorkspace), m.peak_total_bytes / 1048576.0);
      std::fflush(stdout);
    }
  }
  return 0;
}
