// The whole model and the optimizers on every GPU backend against the CPU backend: the same
// weights, the same batch, and the engine and optimizers unchanged, so any difference comes from
// the GPU kernels. Runs where a GPU is present (label gpu); elsewhere every test skips and says
// why.
//
// Tolerances (fp32): both backends compute in fp32 but sum in different orders (cuBLAS against
// OpenBLAS, block reductions against OpenMP loops), so results differ by a few fp32 roundings per
// reduction. Logits and the loss pass through ~10 dependent reductions: 1e-5 relative to the
// largest magnitude. Gradients pass through twice as many: 2e-5 of each tensor's largest magnitude.
// Weights after K optimizer steps: 1e-5 of the tensor's largest magnitude (an update is small next
// to the weight; AdamW 1e-4, its case says why). bf16 storage: one bf16 ulp (2^-8 relative) may
// flip where the fp32 values straddle a rounding boundary, so 1e-2 of the largest magnitude, and at
// most 1% of the elements may differ. Every comparison prints the largest difference it saw, so a
// GPU run's log records the margins.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/counter_hash.h"
#include "worker/engine/llama_model.h"
#include "worker/engine/llama_weights.h"
#include "worker/optim/optimizer.h"

namespace lomo {
namespace {

std::vector<Device> gpus() {
  std::vector<Device> devices;
  for (Device device : available_backends()) {
    if (!device.is_cpu()) devices.push_back(device);
  }
  return devices;
}

// The first GPU, or skips the test.
#define REQUIRE_GPU(device)                                                                  \
  if (gpus().empty()) {                                                                      \
    GTEST_SKIP() << "no CUDA device on this machine (or a build without the CUDA backend): " \
                    "the GPU is compared with the CPU only where one is present";            \
  }                                                                                          \
  const Device device = gpus().front()

struct Shape {
  std::string name;
  int64_t vocab, hidden, intermediate, layers, heads, kv_heads, head_dim;
  int64_t batch, seq_len;
  bool tied = false, checkpointing = false, llama3_rope = false, packed = false;
  // Llama attention_bias + mlp_bias (biases on all seven projections); Mistral's window (> 0).
  bool biases = false;
  int64_t sliding_window = 0;
};

void PrintTo(const Shape& s, std::ostream* os) { *os << s.name; }

LlamaConfig config_of(const Shape& s) {
  LlamaConfig c;
  c.vocab_size = s.vocab;
  c.hidden_size = s.hidden;
  c.intermediate_size = s.intermediate;
  c.num_hidden_layers = s.layers;
  c.num_attention_heads = s.heads;
  c.num_key_value_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.max_position_embeddings = 4 * s.seq_len + 16;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500.0;
  c.tie_word_embeddings = s.tied;
  c.qkv_bias = c.o_proj_bias = c.mlp_bias = s.biases;
  if (s.sliding_window > 0) {
    c.family = ModelFamily::kMistral;
    c.sliding_window = s.sliding_window;
  }
  if (s.llama3_rope) {
    c.rope_scaling.type = RopeScaling::Type::kLlama3;
    c.rope_scaling.factor = 8.0;
    c.rope_scaling.original_max_position_embeddings = 16;
  }
  return c;
}

// Deterministic tokens, some targets ignored, segments for packing.
TokenBatch batch_of(const Shape& s, uint64_t seed) {
  TokenBatch batch;
  batch.batch_size = s.batch;
  batch.seq_len = s.seq_len;
  const int64_t rows = s.batch * s.seq_len;
  for (int64_t i = 0; i < rows; ++i) {
    const uint64_t r = mix_bits(seed * 1000003u + static_cast<uint64_t>(i));
    batch.input_ids.push_back(static_cast<int32_t>(r % static_cast<uint64_t>(s.vocab)));
    batch.targets.push_back(r % 7 == 3 ? kIgnoreIndex : static_cast<int32_t>((r >> 20) % s.vocab));
    if (s.packed) batch.segment_ids.push_back(static_cast<int32_t>((i % s.seq_len) / 5));
  }
  return batch;
}

std::vector<float> to_host_f32(const Parameter& p) {
  std::vector<char> raw(p.size_bytes());
  backend_for(p.storage.device()).copy_to_host(raw.data(), p.storage.data(), raw.size());
  std::vector<float> values(static_cast<size_t>(p.numel()));
  convert_to_float(p.dtype, raw.data(), values.data(), values.size());
  return values;
}

// Copies each delivered gradient to the host.
class HostCopySink : public GradientSink {
 public:
  void consume(Parameter& parameter, const TensorView& view) override {
    std::vector<float>& host = gradients[parameter.name];
    host.resize(static_cast<size_t>(view.numel()));
    backend_for(view.device).copy_to_host(host.data(), view.data, host.size() * sizeof(float));
  }
  std::map<std::string, std::vector<float>> gradients;
};

// One device's model with weights equal to the host's initialisation.
struct DeviceModel {
  DeviceModel(Device device, const Shape& s, DType dtype)
      : accountant(device), weights(config_of(s), dtype, accountant) {
    MemoryAccountant host_accountant;
    LlamaWeights host(config_of(s), dtype, host_accountant);
    // N(0, 0.25/hidden): logits of order one, as in a trained model. Much larger weights make
    // the softmax so sharp that the fp32 rounding of the logits (5e-6 relative at 0.3·√hidden
    // scale) moves dlogits by 1e-4: then both backends are right and still 4e-5 apart.
    host.init_random(11, static_cast<float>(0.5 / std::sqrt(static_cast<double>(s.hidden))));
    for (Parameter& p : host.parameters()) {  // init_random zeroes biases: make them count
      if (!p.is_bias) continue;
      std::vector<float> values(static_cast<size_t>(p.numel()));
      for (size_t i = 0; i < values.size(); ++i) values[i] = 0.1f * std::sin(1.3f * (i + 1));
      convert_from_float(p.dtype, values.data(), p.storage.data(), values.size());
    }
    weights.copy_values_from(host);
    model = std::make_unique<LlamaModel>(weights, accountant, ModelOptions{s.checkpointing});
  }
  MemoryAccountant accountant;
  LlamaWeights weights;
  std::unique_ptr<LlamaModel> model;
};

struct PassResult {
  ForwardResult forward;
  std::vector<float> logits;
  std::map<std::string, std::vector<float>> gradients;
};

PassResult forward_backward(DeviceModel& m, const TokenBatch& batch) {
  PassResult result;
  result.forward = m.model->forward(batch);
  result.logits.resize(
      static_cast<size_t>(batch.batch_size * batch.seq_len * m.weights.config().vocab_size));
  m.model->backend().copy_to_host(result.logits.data(), m.model->logits(),
                                  result.logits.size() * sizeof(float));
  HostCopySink sink;
  m.model->backward(sink);
  result.gradients = std::move(sink.gradients);
  return result;
}

// max |got − want| / max|want|, printed and returned.
double relative_difference(const std::vector<float>& got, const std::vector<float>& want,
                           const std::string& what) {
  EXPECT_EQ(got.size(), want.size()) << what;
  double scale = 1e-30, worst = 0.0;
  for (float w : want) scale = std::max(scale, static_cast<double>(std::abs(w)));
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    const double d = std::abs(static_cast<double>(got[i]) - want[i]);
    worst = std::isfinite(d) ? std::max(worst, d) : INFINITY;
  }
  return worst / scale;
}

class GpuModelTest : public ::testing::TestWithParam<Shape> {};

TEST_P(GpuModelTest, LogitsLossAndEveryGradientMatchTheCpu) {
  REQUIRE_GPU(gpu);
  const Shape s = GetParam();
  const TokenBatch batch = batch_of(s, 1);
  DeviceModel cpu_model(Device::cpu(), s, DType::kF32), gpu_model(gpu, s, DType::kF32);
  const PassResult want = forward_backward(cpu_model, batch);
  const PassResult got = forward_backward(gpu_model, batch);

  EXPECT_EQ(got.forward.counted_tokens, want.forward.counted_tokens);
  EXPECT_NEAR(got.forward.loss, want.forward.loss, 1e-5 * std::abs(want.forward.loss));
  const double logits = relative_difference(got.logits, want.logits, "logits");
  EXPECT_LE(logits, 1e-5);
  double worst_gradient = 0.0;
  ASSERT_EQ(got.gradients.size(), want.gradients.size());
  for (const auto& [name, gradient] : want.gradients) {
    ASSERT_EQ(got.gradients.count(name), 1u) << name << " not delivered on the GPU";
    const double d = relative_difference(got.gradients.at(name), gradient, name);
    EXPECT_LE(d, 2e-5) << name;
    worst_gradient = std::max(worst_gradient, d);
  }
  std::printf("[%s] loss cpu %.9g gpu %.9g; logits rel diff %.3g; worst gradient rel diff %.3g\n",
              s.name.c_str(), want.forward.loss, got.forward.loss, logits, worst_gradient);

  // Same buffers on both devices, so the memory claims carry over, except what attention saves for
  // backward, which is each backend's own (today both save B·H·T log-sum-exps and the first keys,
  // so the difference is 0), one such buffer per layer kept (one with checkpointing). Workspace may
  // differ: the backends' attention scratch differs.
  const MemoryReport cpu_memory = cpu_model.accountant.report();
  const MemoryReport gpu_memory = gpu_model.accountant.report();
  for (MemoryKind kind :
       {MemoryKind::kParameters, MemoryKind::kGradients, MemoryKind::kOptimizerState}) {
    EXPECT_EQ(gpu_memory.peak(kind), cpu_memory.peak(kind)) << memory_kind_name(kind);
  }
  const AttentionShape attention{s.batch,    s.seq_len,  s.heads,
                                 s.kv_heads, s.head_dim, s.sliding_window};
  const int64_t layers_kept = s.checkpointing ? 1 : s.layers;
  const int64_t saved_difference = layers_kept * static_cast<int64_t>(sizeof(float)) *
                                   (backend_for(Device::cpu()).attention_saved_floats(attention) -
                                    backend_for(gpu).attention_saved_floats(attention));
  EXPECT_EQ(static_cast<int64_t>(gpu_memory.peak(MemoryKind::kActivations)),
            static_cast<int64_t>(cpu_memory.peak(MemoryKind::kActivations)) - saved_difference)
      << "activations, beside attention's saved state";
}

const Shape kShapes[] = {
    // name, vocab, hidden, inter, layers, heads, kv, head_dim, batch, seq
    {"Tiny", 13, 16, 20, 2, 4, 4, 4, 2, 5},
    {"TinyGqa2Tied", 13, 16, 20, 2, 4, 2, 4, 2, 5, true},
    {"TinyGqa4Checkpointed", 13, 16, 20, 2, 4, 1, 4, 2, 5, false, true},
    {"TinyLlama3Packed", 13, 16, 20, 2, 4, 2, 4, 2, 16, false, false, true, true},
    {"SequenceOfOne", 29, 24, 40, 1, 2, 1, 12, 3, 1},
    // Sizes that are not multiples of any tile: vocab 1000, hidden 72, head_dim 12, T = 37.
    {"OddShapesGqa8", 1000, 96, 200, 2, 8, 1, 12, 3, 37},
    {"OddShapesGqa2", 1001, 72, 130, 2, 6, 3, 12, 2, 67, false, true},
    // Projection biases (kernels/cuda/bias.cu) and Mistral's sliding window, packed too.
    {"LlamaBiasesOddShapes", 1000, 72, 130, 2, 6, 3, 12, 2, 37, false, false, false, false, true},
    {"MistralWindow3Packed", 13, 16, 20, 2, 4, 2, 4, 2, 37, false, true, false, true, false, 3},
};

INSTANTIATE_TEST_SUITE_P(Shapes, GpuModelTest, ::testing::ValuesIn(kShapes),
                         [](const ::testing::TestParamInfo<Shape>& info) {
                           return info.param.name;
                         });

// ‖got − want‖₂ / ‖want‖₂.
double relative_l2(const std::vector<float>& got, const std::vector<float>& want) {
  double difference = 0.0, norm = 1e-300;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    difference += d * d;
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(difference / norm);
}

// bf16 weights multiplied as stored on the GPU's tensor cores (MatmulPrecision::kBf16: activations
// and output gradients narrowed to bf16 for each product, fp32 accumulation), against the CPU
// multiplying the same bf16 weights widened to fp32 with fp32 activations. The narrowing rounds
// each product input by up to 2^-9 relative, so (as tests/unit/gemm_kernel_test.cc states for the
// CPU's bf16 mode) the loss within 1% and each gradient within 3% in relative L2 norm; the logits
// within 2% of their largest magnitude.
TEST(GpuBf16Products, LossLogitsAndGradientsStayWithinBf16ToleranceOfTheCpu) {
  REQUIRE_GPU(gpu);
  struct RestoreFp32 {
    Device device;
    ~RestoreFp32() { backend_for(device).set_matmul_precision(Backend::MatmulPrecision::kFp32); }
  } restore{gpu};
  for (const Shape& s : kShapes) {
    if (s.vocab < 100 && s.name != "TinyGqa2Tied") continue;  // the larger shapes, and tied
    const TokenBatch batch = batch_of(s, 3);
    DeviceModel cpu_model(Device::cpu(), s, DType::kBF16), gpu_model(gpu, s, DType::kBF16);
    const PassResult want = forward_backward(cpu_model, batch);
    backend_for(gpu).set_matmul_precision(Backend::MatmulPrecision::kBf16);
    ASSERT_EQ(backend_for(gpu).product_dtype(), DType::kBF16);
    const PassResult got = forward_backward(gpu_model, batch);
    backend_for(gpu).set_matmul_precision(Backend::MatmulPrecision::kFp32);
    EXPECT_NEAR(got.forward.loss, want.forward.loss, 1e-2 * std::abs(want.forward.loss)) << s.name;
    const double logits = relative_difference(got.logits, want.logits, "logits");
    EXPECT_LE(logits, 2e-2) << s.name;
    double worst = 0.0;
    for (const auto& [name, gradient] : want.gradients) {
      ASSERT_EQ(got.gradients.count(name), 1u) << name;
      const double d = relative_l2(got.gradients.at(name), gradient);
      EXPECT_LE(d, 3e-2) << s.name << " " << name;
      worst = std::max(worst, d);
    }
    std::printf("[bf16 products %s] loss cpu %.6g gpu %.6g; logits %.3g; worst gradient L2 %.3g\n",
                s.name.c_str(), want.forward.loss, got.forward.loss, logits, worst);
  }
}

struct OptimizerCase {
  std::string name;
  OptimizerOptions options;
  DType dtype = DType::kF32;
  // fp32 weights after K steps, relative to each tensor's largest magnitude.
  double fp32_tolerance = 1e-5;
};

void PrintTo(const OptimizerCase& c, std::ostream* os) { *os << c.name; }

std::vector<OptimizerCase> optimizer_cases() {
  std::vector<OptimizerCase> cases;
  OptimizerOptions lomo;
  cases.push_back({"Lomo", lomo});
  OptimizerOptions clip = lomo;
  clip.clip_grad_norm = 0.5;
  clip.weight_decay = 0.01;
  cases.push_back({"LomoClipNorm", clip});
  OptimizerOptions clip_value = lomo;
  clip_value.clip_grad_value = 0.01;
  cases.push_back({"LomoClipValue", clip_value});
  OptimizerOptions adalomo;
  adalomo.kind = OptimizerOptions::Kind::kAdaLomo;
  adalomo.weight_decay = 0.01;
  cases.push_back({"AdaLomo", adalomo});
  OptimizerOptions adamw;
  adamw.kind = OptimizerOptions::Kind::kAdamW;
  adamw.weight_decay = 0.01;
  // AdamW divides by √v: an element whose gradient nearly cancels gets a step of up to lr whatever
  // its size, so fp32 noise in that gradient moves the weight by a fraction of lr rather than of
  // the gradient. Measured on an H100: 3.3e-6 with per-row attention kernels, 1.04e-5 with the
  // cuBLAS-built attention (another summation order); 1e-4 ≈ 1e-3·lr·K in absolute terms here.
  cases.push_back({"AdamW", adamw, DType::kF32, 1e-4});
  OptimizerOptions sgd;
  sgd.kind = OptimizerOptions::Kind::kSgd;
  sgd.clip_grad_norm = 1.0;
  cases.push_back({"SgdClip", sgd});
  OptimizerOptions fp16 = lomo;
  fp16.clip_grad_norm = 1.0;
  fp16.loss_scaling = LossScalerOptions{std::ldexp(1.0, 40), 1000, 2.0, 1.0};  // overflows first
  cases.push_back({"LomoFp16LossScaling", fp16, DType::kF16});
  OptimizerOptions bf16 = lomo;
  bf16.stochastic_rounding = true;
  bf16.seed = 5;
  cases.push_back({"LomoBf16StochasticRounding", bf16, DType::kBF16});
  OptimizerOptions adalomo_bf16 = adalomo;
  adalomo_bf16.stochastic_rounding = true;
  cases.push_back({"AdaLomoBf16", adalomo_bf16, DType::kBF16});
  return cases;
}

class GpuOptimizerTest : public ::testing::TestWithParam<OptimizerCase> {};

TEST_P(GpuOptimizerTest, KStepsLeaveTheSameWeightsAsTheCpu) {
  REQUIRE_GPU(gpu);
  const OptimizerCase c = GetParam();
  const Shape s{"Optimizer", 97, 32, 48, 2, 4, 2, 8, 2, 9};
  DeviceModel cpu_model(Device::cpu(), s, c.dtype), gpu_model(gpu, s, c.dtype);
  auto cpu_optimizer = make_optimizer(c.options, cpu_model.weights, cpu_model.accountant, nullptr);
  auto gpu_optimizer = make_optimizer(c.options, gpu_model.weights, gpu_model.accountant, nullptr);
  constexpr int kSteps = 4;
  for (int step = 1; step <= kSteps; ++step) {
    const TokenBatch batch = batch_of(s, static_cast<uint64_t>(step));
    cpu_model.model->forward(batch);
    gpu_model.model->forward(batch);
    const StepResult want = cpu_optimizer->step(*cpu_model.model, step, 1e-2);
    const StepResult got = gpu_optimizer->step(*gpu_model.model, step, 1e-2);
    EXPECT_EQ(got.skipped, want.skipped) << "step " << step;
    EXPECT_EQ(got.loss_scale, want.loss_scale) << "step " << step;
    EXPECT_NEAR(got.loss, want.loss, 1e-5 * std::abs(want.loss)) << "step " << step;
    if (std::isfinite(want.grad_norm)) {
      EXPECT_NEAR(got.grad_norm, want.grad_norm, 2e-5 * want.grad_norm) << "step " << step;
    }
  }
  const bool low_precision = c.dtype != DType::kF32;
  double worst = 0.0;
  for (size_t t = 0; t < cpu_model.weights.parameters().size(); ++t) {
    const Parameter& p = cpu_model.weights.parameters()[t];
    const std::vector<float> want = to_host_f32(p);
    const std::vector<float> got = to_host_f32(gpu_model.weights.parameters()[t]);
    const double d = relative_difference(got, want, p.name);
    worst = std::max(worst, d);
    EXPECT_LE(d, low_precision ? 1e-2 : c.fp32_tolerance) << p.name;
    if (low_precision) {
      size_t differing = 0;
      for (size_t i = 0; i < want.size(); ++i) differing += got[i] != want[i] ? 1 : 0;
      EXPECT_LE(differing, want.size() / 100 + 1) << p.name << ": elements that differ";
    }
  }
  std::printf("[%s] after %d steps: worst weight rel diff %.3g\n", c.name.c_str(), kSteps, worst);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, GpuOptimizerTest, ::testing::ValuesIn(optimizer_cases()),
                         [](const ::testing::TestParamInfo<OptimizerCase>& info) {
                           return info.param.name;
                         });

}  // namespace
}  // namespace lomo
