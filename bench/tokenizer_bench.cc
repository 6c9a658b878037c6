// Encode throughput of both tokenizers (tokenizer.json BPE, byte-level or SentencePiece-style;
// SentencePiece tokenizer.model) on one thread, over a few MB of generated mixed text
// (English-like prose, other scripts, numbers, code, whitespace runs) cut into documents the way
// a data pipeline hands them over. Prints figures; asserts nothing.
//
//   tokenizer_bench [--mb N] [--text FILE] [--bpe MODEL_DIR] [--sp TOKENIZER_MODEL]
//
// --text encodes the first N MB of a file instead, cut into 4 KB documents (generated text has a
// small vocabulary of words, which flatters the BPE's whole-word lookups).
// The default BPE is the small test tokenizer (1,008 tokens); pass a real model directory (e.g.
// Llama 3's) with --bpe for figures at full vocabulary size.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/counter_hash.h"
#include "worker/data/sentencepiece_tokenizer.h"
#include "worker/data/tokenizer.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  double megabytes = 4.0;
  std::filesystem::path text_file;  // generated text when empty
  std::filesystem::path bpe_dir = LOMO_BENCH_BPE_DIR;
  std::filesystem::path sp_model = LOMO_BENCH_SP_MODEL;
};

// splitmix64, so that the text is the same on every platform.
using Rng = lomo::SplitMix64;

// Documents of 1-8 KB: mostly English words with punctuation, some numbers, some words in other
// scripts, some code lines with indentation.
std::vector<std::string> make_documents(size_t total_bytes) {
  static constexpr std::string_view kWords[] = {
      "the",     "of",        "and",    "to",       "in",     "a",         "is",    "that",
      "for",     "it",        "as",     "was",      "with",   "be",        "by",    "on",
      "not",     "he",        "this",   "are",      "or",     "his",       "from",  "at",
      "which",   "but",       "have",   "an",       "had",    "they",      "you",   "were",
      "their",   "one",       "all",    "we",       "can",    "her",       "has",   "there",
      "been",    "if",        "more",   "when",     "will",   "would",     "who",   "so",
      "model",   "training",  "memory", "gradient", "update", "optimizer", "token", "language",
      "fine",    "parameter", "layer",  "weights",  "batch",  "sequence",  "loss",  "learning",
      "It's",    "don't",     "we're",  "they'll",  "I've",   "Müller",    "naïve", "café",
      "données", "größer",    "año",    "привет",   "мир",    "данные",    "中文",  "数据",
      "日本語",  "テキスト",  "한국어", "नमस्ते",     "مرحبا",  "שלום",      "😀",     "🚀"};
  static constexpr std::string_view kPunctuation[] = {".", ",", "!", "?", ";", ":", " -", "\""};
  static constexpr std::string_view kCode[] = {"    for (int i = 0; i < n; ++i) {\n",
                                               "        total += values[i] * 2;\n",
                                               "    }\n",
                                               "def train(model, data):\n",
                                               "    return loss.item()\n",
                                               "\tif (x == nullptr) return;\n"};
  Rng rng(0x746f6b656e73ull);  // "tokens"
  std::vector<std::string> documents;
  size_t bytes = 0;
  while (bytes < total_bytes) {
    std::string doc;
    const size_t target = 1024 + rng.below(7 * 1024);
    while (doc.size() < target) {
      const size_t kind = rng.below(100);
      if (kind < 80) {
        if (!doc.empty() && doc.back() != '\n') doc += ' ';
        doc += kWords[rng.below(std::size(kWords))];
        if (rng.below(8) == 0) doc += kPunctuation[rng.below(std::size(kPunctuation))];
      } else if (kind < 88) {
        doc += ' ';
        doc += std::to_string(rng.next() % 100000);
      } else if (kind < 94) {
        doc += "\n\n";
      } else {
        doc += '\n';
        doc += kCode[rng.below(std::size(kCode))];
      }
    }
    bytes += doc.size();
    documents.push_back(std::move(doc));
  }
  return documents;
}

void bench(const char* name, const lomo::Tokenizer& tokenizer,
           const std::vector<std::string>& documents, size_t total_bytes) {
  double best = 1e30;
  size_t tokens = 0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    const auto start = Clock::now();
    size_t count = 0;
    for (const std::string& doc : documents) count += tokenizer.encode(doc).size();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
    tokens = count;
  }
  std::printf("%-14s vocab %7lld  %9zu tokens  %6.2f bytes/token  %9.0f tokens/s  %6.2f MB/s\n",
              name, static_cast<long long>(tokenizer.vocab_size()), tokens,
              static_cast<double>(total_bytes) / static_cast<double>(tokens), tokens / best,
              total_bytes / best / 1e6);
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--mb") {
      args.megabytes = std::atof(argv[i + 1]);
    } else if (flag == "--text") {
      args.text_file = argv[i + 1];
    } else if (flag == "--bpe") {
      args.bpe_dir = argv[i + 1];
    } else if (flag == "--sp") {
      args.sp_model = argv[i + 1];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--mb N] [--text FILE] [--bpe MODEL_DIR] [--sp TOKENIZER_MODEL]\n",
                   argv[0]);
      return 2;
    }
  }
  const auto bytes = static_cast<size_t>(args.megabytes * 1e6);
  std::vector<std::string> documents;
  if (args.text_file.empty()) {
    documents = make_documents(bytes);
  } else {
    std::ifstream file(args.text_file, std::ios::binary);
    std::string chunk(4096, '\0');
    size_t read = 0;
    while (read < bytes && file.read(chunk.data(), static_cast<std::streamsize>(chunk.size()))) {
      documents.push_back(chunk);
      read += chunk.size();
    }
    if (documents.empty()) {
      std::fprintf(stderr, "tokenizer_bench: cannot read %s\n", args.text_file.c_str());
      return 1;
    }
  }
  size_t total_bytes = 0;
  for (const std::string& doc : documents) total_bytes += doc.size();
  std::printf("text: %zu documents, %.2f MB; one thread, best of 3\n", documents.size(),
              total_bytes / 1e6);
  try {
    auto start = Clock::now();
    const auto bpe = lomo::load_tokenizer(args.bpe_dir);
    std::printf("load %s: %.3f s\n", args.bpe_dir.c_str(),
                std::chrono::duration<double>(Clock::now() - start).count());
    bench("tokenizer.json", *bpe, documents, total_bytes);
    start = Clock::now();
    const auto sp = lomo::SentencePieceTokenizer::load(args.sp_model);
    std::printf("load %s: %.3f s\n", args.sp_model.c_str(),
                std::chrono::duration<double>(Clock::now() - start).count());
    bench("SentencePiece", *sp, documents, total_bytes);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "tokenizer_bench: %s\n", error.what());
    return 1;
  }
  return 0;
}
