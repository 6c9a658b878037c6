// Loading throughput of the data pipeline on one thread: a generated JSONL file (~100 MB by
// default) of chat records (llama-3 template) and one of Alpaca records is read, parsed, templated
// and tokenised with the byte-level BPE test tokenizer into samples (load_samples), then cut into
// packed training batches. Prints records/s, tokens/s and MB/s of each stage and how many times
// the training token rate that is; asserts nothing.
//
//   data_bench [--mb N] [--dir DIR] [--bpe MODEL_DIR] [--sp TOKENIZER_MODEL] [--max-length T]
//              [--keep]
//
// The chat file is also loaded with the llama-2 template and the Llama 2 SentencePiece model
// (--sp), the slowest tokenizer here. The files are written to DIR (default /tmp) and removed
// afterwards unless --keep. Generated text uses a small vocabulary of words, which flatters the
// BPE's word cache; pass a real model directory with --bpe for figures at full vocabulary size.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/counter_hash.h"
#include "worker/data/sample_loader.h"
#include "worker/data/sentencepiece_tokenizer.h"
#include "worker/data/tokenizer.h"
#include "worker/train/token_dataset.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

// Training token rates on this machine (docs/PERFORMANCE.md): the 58M-parameter reference model
// and the 0.76M tiny model, CPU.
constexpr double kReferenceModelTokensPerSecond = 750.0;
constexpr double kTinyModelTokensPerSecond = 25000.0;

struct Args {
  double megabytes = 100.0;
  fs::path dir = "/tmp";
  fs::path bpe_dir = LOMO_BENCH_BPE_DIR;
  fs::path sp_model = LOMO_BENCH_SP_MODEL;
  int64_t max_length = 2048;
  bool keep = false;
};

// splitmix64, so that the files are the same on every platform.
using Rng = lomo::SplitMix64;

// Prose of `words` words: mostly English, some numbers, other scripts, line breaks.
std::string prose(Rng& rng, size_t words) {
  static constexpr std::string_view kWords[] = {
      "the",    "of",        "and",     "to",       "in",      "a",         "is",     "that",
      "for",    "it",        "as",      "was",      "with",    "be",        "by",     "on",
      "not",    "this",      "are",     "or",       "from",    "at",        "which",  "but",
      "have",   "an",        "they",    "you",      "were",    "their",     "one",    "all",
      "model",  "training",  "memory",  "gradient", "update",  "optimizer", "token",  "language",
      "fine",   "parameter", "layer",   "weights",  "batch",   "sequence",  "loss",   "learning",
      "answer", "question",  "example", "explain",  "because", "however",   "result", "step",
      "It's",   "don't",     "we're",   "Müller",   "café",    "données",   "año",    "привет",
      "中文",   "数据",      "日本語",  "😀"};
  static constexpr std::string_view kPunctuation[] = {".", ",", "!", "?", ":", ";"};
  std::string text;
  for (size_t w = 0; w < words; ++w) {
    if (!text.empty()) text += rng.below(40) == 0 ? "\n" : " ";
    if (rng.below(12) == 0) {
      text += std::to_string(rng.next() % 10000);
    } else {
      text += kWords[rng.below(std::size(kWords))];
    }
    if (rng.below(9) == 0) text += kPunctuation[rng.below(std::size(kPunctuation))];
  }
  return text;
}

std::string chat_record(Rng& rng) {
  nlohmann::json messages = nlohmann::json::array();
  if (rng.below(2) == 0)
    messages.push_back({{"role", "system"}, {"content", prose(rng, 8 + rng.below(20))}});
  const size_t turns = 1 + rng.below(3);
  for (size_t t = 0; t < turns; ++t) {
    messages.push_back({{"role", "user"}, {"content", prose(rng, 10 + rng.below(80))}});
    messages.push_back({{"role", "assistant"}, {"content", prose(rng, 30 + rng.below(150))}});
  }
  return nlohmann::json{{"messages", messages}}.dump();
}

std::string alpaca_record(Rng& rng) {
  return nlohmann::json{{"instruction", prose(rng, 8 + rng.below(30))},
                        {"input", rng.below(2) == 0 ? "" : prose(rng, 10 + rng.below(60))},
                        {"output", prose(rng, 20 + rng.below(200))}}
      .dump();
}

fs::path generate(const fs::path& path, size_t bytes, std::string (*record)(Rng&)) {
  Rng rng(0x64617461ull);  // "data"
  std::ofstream out(path, std::ios::binary);
  size_t written = 0;
  while (written < bytes) {
    const std::string line = record(rng) + "\n";
    out << line;
    written += line.size();
  }
  return path;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void bench(const char* name, const fs::path& file, const lomo::Tokenizer& tokenizer,
           lomo::LoadOptions options) {
  const double megabytes = static_cast<double>(fs::file_size(file)) / 1e6;

  // JSON alone: what parsing costs before any templating or tokenisation.
  auto start = Clock::now();
  std::ifstream in(file, std::ios::binary);
  std::string line;
  size_t records = 0;
  while (std::getline(in, line)) {
    const nlohmann::json parsed = nlohmann::json::parse(line);
    records += parsed.is_object() ? 1 : 0;
  }
  const double json_seconds = seconds_since(start);

  // The whole loader: read, parse, template, tokenise, store.
  start = Clock::now();
  lomo::LoadedSamples loaded = lomo::load_samples({file.string()}, tokenizer, options);
  const double load_seconds = seconds_since(start);
  const auto tokens = static_cast<double>(loaded.store.tokens.size());

  // Batching: every sample once into packed rows of max_length.
  lomo::DatasetOptions dataset_options;
  dataset_options.max_length = options.max_length;
  dataset_options.packing = true;
  dataset_options.seed = 1;
  start = Clock::now();
  lomo::TokenDataset dataset(std::move(loaded.store), dataset_options);
  const int64_t batches = dataset.batches_for_epochs(1, 8);
  double batch_tokens = 0;
  for (int64_t b = 0; b < batches; ++b) {
    const lomo::TokenBatch batch = dataset.next_batch(8);
    batch_tokens += static_cast<double>(batch.input_ids.size());
  }
  const double batch_seconds = seconds_since(start);

  const double rate = tokens / load_seconds;
  std::printf("%s: %.1f MB, %zu records, %.0f tokens (%.2f bytes/token), %lld truncated\n", name,
              megabytes, records, tokens, megabytes * 1e6 / tokens,
              static_cast<long long>(loaded.report.truncated));
  std::printf("  JSON parse only      %7.2f s  %9.0f records/s  %6.1f MB/s\n", json_seconds,
              static_cast<double>(records) / json_seconds, megabytes / json_seconds);
  std::printf(
      "  load (parse+template+tokenise) %7.2f s  %9.0f records/s  %10.0f tokens/s  "
      "%6.1f MB/s\n",
      load_seconds, static_cast<double>(records) / load_seconds, rate, megabytes / load_seconds);
  std::printf("  packed batching      %7.2f s  %10.0f tokens/s (%lld batches of 8 x %lld)\n",
              batch_seconds, batch_tokens / batch_seconds, static_cast<long long>(batches),
              static_cast<long long>(options.max_length));
  std::printf(
      "  load rate = %.0fx the 58M reference model's training rate (%.0f tokens/s), "
      "%.1fx the tiny model's (%.0f tokens/s)\n",
      rate / kReferenceModelTokensPerSecond, kReferenceModelTokensPerSecond,
      rate / kTinyModelTokensPerSecond, kTinyModelTokensPerSecond);
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const bool has_value = i + 1 < argc;
    if (flag == "--mb" && has_value) {
      args.megabytes = std::atof(argv[++i]);
    } else if (flag == "--dir" && has_value) {
      args.dir = argv[++i];
    } else if (flag == "--bpe" && has_value) {
      args.bpe_dir = argv[++i];
    } else if (flag == "--sp" && has_value) {
      args.sp_model = argv[++i];
    } else if (flag == "--max-length" && has_value) {
      args.max_length = std::atoll(argv[++i]);
    } else if (flag == "--keep") {
      args.keep = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--mb N] [--dir DIR] [--bpe MODEL_DIR] [--sp TOKENIZER_MODEL] "
                   "[--max-length T] [--keep]\n",
                   argv[0]);
      return 2;
    }
  }
  try {
    const auto tokenizer = lomo::load_tokenizer(args.bpe_dir);
    const auto bytes = static_cast<size_t>(args.megabytes * 1e6);
    std::printf("one thread; tokenizer %s (vocab %lld); max_length %lld\n", args.bpe_dir.c_str(),
                static_cast<long long>(tokenizer->vocab_size()),
                static_cast<long long>(args.max_length));
    // Chat records need the llama-3 template's tokens, which the default tokenizer has.
    const fs::path chat = generate(args.dir / "lomo_data_bench_chat.jsonl", bytes, chat_record);
    lomo::LoadOptions options;
    options.format = lomo::DataFormat::kChat;
    options.chat_template = lomo::ChatTemplate::kLlama3;
    options.max_length = args.max_length;
    bench("chat (llama-3, byte-level BPE)", chat, *tokenizer, options);
    const auto sentencepiece = lomo::SentencePieceTokenizer::load(args.sp_model);
    options.chat_template = lomo::ChatTemplate::kLlama2;
    bench("chat (llama-2, SentencePiece)", chat, *sentencepiece, options);
    if (!args.keep) fs::remove(chat);

    const fs::path alpaca =
        generate(args.dir / "lomo_data_bench_alpaca.jsonl", bytes, alpaca_record);
    options.format = lomo::DataFormat::kAlpaca;
    options.chat_template.reset();
    bench("alpaca (byte-level BPE)", alpaca, *tokenizer, options);
    if (!args.keep) fs::remove(alpaca);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "data_bench: %s\n", error.what());
    return 1;
  }
  return 0;
}
