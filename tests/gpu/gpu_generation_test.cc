// Generation on a GPU: the KV-cache forward (kernels/backend.h calls only) on the CUDA backend
// against the CPU, and transformers' greedy tokens (tests/data/generation/greedy.json) on the GPU.
// Skips, saying why, without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "worker/engine/checkpoint_io.h"
#include "worker/engine/kv_cache_model.h"
#include "worker/generate/generation.h"

namespace lomo {
namespace {

const std::filesystem::path kData = std::filesystem::path(LOMO_TEST_DATA_DIR);

std::optional<Device> first_gpu() {
  for (Device device : available_backends()) {
    if (!device.is_cpu()) return device;
  }
  return std::nullopt;
}

// Prefill 6 tokens, then 18 one at a time; logits of every position.
std::vector<float> cached_logits(LlamaWeights& weights, MemoryAccountant& accountant) {
  const int64_t vocab = weights.config().vocab_size;
  std::vector<int32_t> tokens;
  for (int i = 0; i < 24; ++i) tokens.push_back(static_cast<int32_t>((i * 7 + 3) % vocab));
  KvCacheModel model(weights, accountant, 24);
  std::vector<float> logits = model.append(std::span(tokens).first(6));
  for (size_t t = 6; t < tokens.size(); ++t) {
    const std::vector<float> row = model.append(std::span(tokens).subspan(t, 1));
    logits.insert(logits.end(), row.begin(), row.end());
  }
  return logits;
}

TEST(GpuGeneration, KvCacheLogitsAndGreedyTokensMatchTheCpu) {
  const std::optional<Device> gpu = first_gpu();
  if (!gpu) GTEST_SKIP() << "no CUDA device on this machine (or a build without the CUDA backend)";
  backend_for(*gpu).set_matmul_precision(Backend::MatmulPrecision::kFp32);
  std::ifstream in(kData / "generation" / "greedy.json");
  const nlohmann::json fixture = nlohmann::json::parse(in);
  for (const std::string variant : {"qwen2_tied", "mistral_window", "llama_bias"}) {
    MemoryAccountant host_accountant, gpu_accountant(*gpu);
    LlamaWeights host = load_llama_checkpoint(kData / "hf" / variant, DType::kF32, host_accountant);
    LlamaWeights device(host.config(), DType::kF32, gpu_accountant);
    device.copy_values_from(host);
    const std::vector<float> want = cached_logits(host, host_accountant);
    const std::vector<float> got = cached_logits(device, gpu_accountant);
    ASSERT_EQ(want.size(), got.size());
    const size_t vocab = static_cast<size_t>(host.config().vocab_size);
    for (size_t row = 0; row < want.size() / vocab; ++row) {
      double scale = 0.0;
      for (size_t j = 0; j < vocab; ++j)
        scale = std::max(scale, std::abs(double(want[row * vocab + j])));
      for (size_t j = 0; j < vocab; ++j) {
        const size_t i = row * vocab + j;
        ASSERT_LE(std::abs(double(got[i]) - want[i]) / scale, 1e-5)
            << variant << " position " << row << " token " << j;
      }
    }
    for (const nlohmann::json& run : fixture["variants"][variant]) {
      const std::vector<int32_t> prompt = run["prompt"];
      GenerationOptions options;
      options.max_new_tokens = fixture["max_new_tokens"];
      KvCacheModel model(device, gpu_accountant,
                         static_cast<int64_t>(prompt.size()) + options.max_new_tokens);
      EXPECT_EQ(generate(model, prompt, options, nullptr).tokens,
                run["no_eos"].get<std::vector<int32_t>>())
          << variant;
    }
  }
}

}  // namespace
}  // namespace lomo
