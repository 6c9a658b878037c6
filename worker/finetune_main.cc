// lomo-finetune: a short full-parameter fine-tune on the CPU with the fused LOMO update.
// Until the data issue brings tokenizers, text is tokenised as raw bytes (ids 0-255), so the
// model's vocabulary must hold at least 256 entries. Until the job spec lands, flags configure it.
//
//   lomo-finetune --model DIR --data FILE [--data FILE...] --out DIR [--steps N] [--lr X]
//                 [--batch B] [--seq T] [--dtype fp32|bf16] [--checkpointing] [--seed S]
// When DIR holds no config.json, a small random LLaMA is created there first (Hugging Face layout).
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "worker/engine/checkpoint_io.h"
#include "worker/engine/llama_model.h"
#include "worker/engine/lomo_sink.h"

namespace fs = std::filesystem;

namespace {

struct Options {
  fs::path model_dir = "out/tiny-llama";
  std::vector<fs::path> data_files;
  fs::path out_dir = "out/finetune";
  int steps = 150;
  float lr = 0.05f;
  int64_t batch = 4;
  int64_t seq = 128;
  lomo::DType dtype = lomo::DType::kF32;
  bool checkpointing = false;
  uint64_t seed = 1;
};

void usage_error(const std::string& message) {
  throw std::invalid_argument(message + "\nusage: lomo-finetune --model DIR --data FILE --out DIR "
                              "[--steps N] [--lr X] [--batch B] [--seq T] [--dtype fp32|bf16] "
                              "[--checkpointing] [--seed S]");
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--checkpointing") {
      o.checkpointing = true;
      continue;
    }
    if (i + 1 >= argc) usage_error("missing value after " + flag);
    const std::string value = argv[++i];
    auto number = [&](auto parse) {
      try {
        size_t used = 0;
        auto parsed = parse(value, &used);
        if (used == value.size()) return parsed;
      } catch (const std::logic_error&) {
      }
      usage_error("bad value '" + value + "' for " + flag);
      return decltype(parse(value, nullptr)){};
    };
    if (flag == "--model") o.model_dir = value;
    else if (flag == "--data") o.data_files.emplace_back(value);
    else if (flag == "--out") o.out_dir = value;
    else if (flag == "--steps") o.steps = number([](const std::string& v, size_t* n) { return std::stoi(v, n); });
    else if (flag == "--lr") o.lr = number([](const std::string& v, size_t* n) { return std::stof(v, n); });
    else if (flag == "--batch") o.batch = number([](const std::string& v, size_t* n) { return std::stoll(v, n); });
    else if (flag == "--seq") o.seq = number([](const std::string& v, size_t* n) { return std::stoll(v, n); });
    else if (flag == "--seed") o.seed = number([](const std::string& v, size_t* n) { return std::stoull(v, n); });
    else if (flag == "--dtype") o.dtype = lomo::dtype_from_user_string(value);
    else usage_error("unknown flag " + flag);
  }
  if (o.data_files.empty()) usage_error("no --data file given");
  if (o.steps <= 0 || o.batch <= 0 || o.seq <= 0 || !(o.lr > 0)) {
    usage_error("--steps, --batch, --seq and --lr must be positive");
  }
  return o;
}

std::string read_corpus(const std::vector<fs::path>& files) {
  std::string text;
  for (const fs::path& file : files) {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw std::runtime_error(file.string() + ": cannot open data file");
    text.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return text;
}

void create_tiny_model(const fs::path& dir, uint64_t seed) {
  lomo::LlamaConfig config;
  config.vocab_size = 256;
  config.hidden_size = 128;
  config.intermediate_size = 344;
  config.num_hidden_layers = 4;
  config.num_attention_heads = 4;
  config.num_key_value_heads = 2;
  config.head_dim = 32;
  config.max_position_embeddings = 1024;
  config.tie_word_embeddings = true;
  lomo::MemoryAccountant accountant;
  lomo::LlamaWeights weights(config, lomo::DType::kF32, accountant);
  weights.init_random(seed, 0.02f);
  lomo::save_llama_checkpoint(weights, dir);
  std::printf("created a random %.2fM-parameter LLaMA in %s\n", weights.parameter_count() / 1e6,
              dir.c_str());
}

// Deterministic windows of seq+1 bytes from [begin, end): inputs and next-byte targets.
lomo::TokenBatch sample_batch(const std::string& text, size_t begin, size_t end, int64_t batch,
                              int64_t seq, uint64_t& state) {
  lomo::TokenBatch b;
  b.batch_size = batch;
  b.seq_len = seq;
  const size_t span = end - begin - static_cast<size_t>(seq) - 1;
  for (int64_t r = 0; r < batch; ++r) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const size_t start = begin + static_cast<size_t>((state >> 33) % span);
    for (int64_t t = 0; t < seq; ++t) {
      b.input_ids.push_back(static_cast<unsigned char>(text[start + static_cast<size_t>(t)]));
      b.targets.push_back(static_cast<unsigned char>(text[start + static_cast<size_t>(t) + 1]));
    }
  }
  return b;
}

int run(const Options& o) {
  if (!fs::exists(o.model_dir / lomo::kConfigFileName)) create_tiny_model(o.model_dir, o.seed);
  lomo::MemoryAccountant accountant;
  lomo::LlamaWeights weights = lomo::load_llama_checkpoint(o.model_dir, o.dtype, accountant);
  if (weights.config().vocab_size < 256) {
    throw std::invalid_argument(o.model_dir.string() + ": byte-level training needs vocab_size >= "
                                "256, config.json has " +
                                std::to_string(weights.config().vocab_size));
  }
  const std::string text = read_corpus(o.data_files);
  const size_t eval_begin = text.size() * 9 / 10;
  if (eval_begin - static_cast<size_t>(o.seq) < static_cast<size_t>(8 * o.seq)) {
    throw std::invalid_argument("data: " + std::to_string(text.size()) +
                                " bytes is too little for --seq " + std::to_string(o.seq));
  }
  lomo::LlamaModel model(weights, accountant, {o.checkpointing});
  lomo::LomoSink sink(o.lr);
  fs::create_directories(o.out_dir);
  std::ofstream metrics(o.out_dir / "metrics.jsonl");

  auto eval_loss = [&]() {
    uint64_t eval_state = 12345;  // the same held-out windows every time
    double total = 0.0;
    for (int i = 0; i < 4; ++i) {
      total += model.forward(sample_batch(text, eval_begin, text.size(), o.batch, o.seq, eval_state))
                   .loss;
    }
    return total / 4;
  };

  std::printf("model %s: %.2fM parameters, %s storage, %d threads; data %zu bytes\n",
              o.model_dir.c_str(), weights.parameter_count() / 1e6,
              std::string(lomo::dtype_name(o.dtype)).c_str(), omp_get_max_threads(), text.size());
  std::printf("eval loss before: %.4f\n", eval_loss());
  uint64_t state = o.seed;
  const auto start = std::chrono::steady_clock::now();
  for (int step = 1; step <= o.steps; ++step) {
    const lomo::TokenBatch batch = sample_batch(text, 0, eval_begin, o.batch, o.seq, state);
    const double loss = model.forward(batch).loss;
    model.backward(sink);
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double tokens_per_second = step * o.batch * o.seq / elapsed;
    const lomo::MemoryReport memory = accountant.report();
    metrics << "{\"step\":" << step << ",\"loss\":" << loss << ",\"lr\":" << o.lr
            << ",\"tokens_per_second\":" << tokens_per_second << ",\"memory\":" << memory.to_json()
            << "}\n";
    if (step % 10 == 0 || step == 1 || step == o.steps) {
      std::printf("step %4d/%d  loss %.4f  %.0f tokens/s  peak %.1f MiB\n", step, o.steps, loss,
                  tokens_per_second, memory.peak_total_bytes / 1048576.0);
      std::fflush(stdout);
    }
  }
  std::printf("eval loss after: %.4f\n", eval_loss());
  std::printf("peak memory by kind:\n%s", accountant.report().to_string().c_str());
  const fs::path checkpoint = o.out_dir / "checkpoint-final";
  lomo::save_llama_checkpoint(weights, checkpoint);
  std::printf("checkpoint written to %s (Hugging Face layout)\n", checkpoint.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_options(argc, argv));
  } catch (const std::exception& e) {
    std::cerr << "lomo-finetune: " << e.what() << "\n";
    return 1;
  }
}
