// A main() for fuzz targets in builds without libFuzzer (GCC, ordinary CI): runs every file of a
// seed corpus through LLVMFuzzerTestOneInput, then a fixed number of deterministic mutations of
// them, so that the parsers' rejection paths are exercised on every test run.
//
//   prog CORPUS_DIR [--mutations N] [--seed S]
//
// The target catches the exceptions its parser documents; any exception that reaches this driver
// is a finding, reported with the input's origin (re-running with the same seed reproduces it),
// and makes the exit status non-zero. Crashes end the process, which the test runner reports.
//
// A target returns 0 for an input its parser accepted and -1 for one it rejected (libFuzzer's own
// convention: -1 keeps an input out of the corpus). Seed names state which to expect: a corpus
// file named valid_* must be accepted and one named invalid_* rejected, so a seed that no longer
// means what its name says (a stale example, a parser that got stricter) is a finding too.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/counter_hash.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

using Bytes = std::vector<uint8_t>;

// Inputs larger than this are cut: the parsers' costs grow with size, not their code paths.
constexpr size_t kMaxInputBytes = 1 << 20;

struct Options {
  std::filesystem::path corpus_dir;
  uint64_t mutations = 0;
  uint64_t seed = 0x6c6f6d6f;  // "lomo"
};

// splitmix64: tiny, and identical on every platform and standard library (unlike <random>'s
// distributions), so a mutation number names the same input everywhere.
using Rng = lomo::SplitMix64;

// Bytes that steer text parsers to their boundaries: JSON structure, digits, signs, NUL, 0xff.
constexpr uint8_t kInterestingBytes[] = {'{', '}', '[', ']', '"',  ',', ':', '-',  '.',  'e',
                                         '0', '1', '9', ' ', '\\', 'n', 0,   0x7f, 0x80, 0xff};
// Little-endian words for length fields: zero, tiny, huge, sign bit, all ones.
constexpr uint64_t kInterestingWords[] = {
    0, 1, 2, 8, 0x7fffffff, 0xffffffff, 1ull << 62, 0x7fffffffffffffffull, 0xffffffffffffffffull};

void flip_bit(Bytes& input, Rng& rng) {
  if (input.empty()) return;
  input[rng.below(input.size())] ^= static_cast<uint8_t>(1u << rng.below(8));
}

void insert_byte(Bytes& input, Rng& rng) {
  const uint8_t value = rng.below(2) ? kInterestingBytes[rng.below(std::size(kInterestingBytes))]
                                     : static_cast<uint8_t>(rng.next());
  input.insert(input.begin() + static_cast<std::ptrdiff_t>(rng.below(input.size() + 1)), value);
}

void erase_bytes(Bytes& input, Rng& rng) {
  if (input.empty()) return;
  const size_t at = rng.below(input.size());
  const size_t count = 1 + rng.below(std::min<size_t>(16, input.size() - at));
  input.erase(input.begin() + static_cast<std::ptrdiff_t>(at),
              input.begin() + static_cast<std::ptrdiff_t>(at + count));
}

void truncate(Bytes& input, Rng& rng) { input.resize(rng.below(input.size() + 1)); }

void overwrite_byte(Bytes& input, Rng& rng) {
  if (input.empty()) return;
  input[rng.below(input.size())] = kInterestingBytes[rng.below(std::size(kInterestingBytes))];
}

void overwrite_word(Bytes& input, Rng& rng) {
  if (input.size() < 8) return;
  // Half the time the start of the input, where binary formats keep their length fields.
  const size_t at = rng.below(2) ? 0 : rng.below(input.size() - 7);
  const uint64_t word = kInterestingWords[rng.below(std::size(kInterestingWords))];
  for (size_t i = 0; i < 8; ++i) input[at + i] = static_cast<uint8_t>(word >> (8 * i));
}

void duplicate_chunk(Bytes& input, Rng& rng) {
  if (input.empty()) return;
  const size_t at = rng.below(input.size());
  const size_t count = 1 + rng.below(std::min<size_t>(64, input.size() - at));
  const Bytes chunk(input.begin() + static_cast<std::ptrdiff_t>(at),
                    input.begin() + static_cast<std::ptrdiff_t>(at + count));
  input.insert(input.begin() + static_cast<std::ptrdiff_t>(rng.below(input.size() + 1)),
               chunk.begin(), chunk.end());
}

// The head of this input joined to the tail of another corpus file.
void splice(Bytes& input, const std::vector<Bytes>& corpus, Rng& rng) {
  const Bytes& other = corpus[rng.below(corpus.size())];
  const size_t keep = rng.below(input.size() + 1);
  const size_t from = rng.below(other.size() + 1);
  input.resize(keep);
  input.insert(input.end(), other.begin() + static_cast<std::ptrdiff_t>(from), other.end());
}

Bytes mutate(const std::vector<Bytes>& corpus, Rng& rng) {
  Bytes input = corpus[rng.below(corpus.size())];
  const size_t steps = 1 + rng.below(4);
  for (size_t step = 0; step < steps; ++step) {
    switch (rng.below(8)) {
      case 0:
        flip_bit(input, rng);
        break;
      case 1:
        insert_byte(input, rng);
        break;
      case 2:
        erase_bytes(input, rng);
        break;
      case 3:
        truncate(input, rng);
        break;
      case 4:
        overwrite_byte(input, rng);
        break;
      case 5:
        overwrite_word(input, rng);
        break;
      case 6:
        duplicate_chunk(input, rng);
        break;
      default:
        splice(input, corpus, rng);
        break;
    }
  }
  if (input.size() > kMaxInputBytes) input.resize(kMaxInputBytes);
  return input;
}

// The input, printable: enough to see what went wrong without a hex editor.
std::string escaped(const Bytes& input) {
  std::string out;
  for (size_t i = 0; i < input.size() && i < 512; ++i) {
    const uint8_t c = input[i];
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char code[5];
      std::snprintf(code, sizeof(code), "\\x%02x", c);
      out += code;
    }
  }
  if (input.size() > 512) out += "...";
  return out;
}

// Only the first few findings are printed in full; one bug tends to surface many times.
constexpr uint64_t kFindingsReported = 10;

// The target's verdict on one input.
enum class Outcome { kAccepted, kRejected, kEscapedException };

// Runs one input; reports (while `report`) an exception that escaped the target.
Outcome run_one(const Bytes& input, const std::string& origin, bool report) {
  try {
    return LLVMFuzzerTestOneInput(input.data(), input.size()) == 0 ? Outcome::kAccepted
                                                                   : Outcome::kRejected;
  } catch (const std::exception& error) {
    if (report) {
      std::fprintf(stderr, "FINDING: %s: unexpected exception: %s\n  input (%zu bytes): %s\n",
                   origin.c_str(), error.what(), input.size(), escaped(input).c_str());
    }
  } catch (...) {
    if (report) {
      std::fprintf(stderr, "FINDING: %s: unexpected non-standard exception\n  input: %s\n",
                   origin.c_str(), escaped(input).c_str());
    }
  }
  return Outcome::kEscapedException;
}

// What a corpus file's name promises: "valid_" seeds are accepted, "invalid_" seeds rejected;
// other names (regression inputs, examples) promise only to be handled without a finding.
std::optional<Outcome> promised_outcome(std::string_view name) {
  if (name.starts_with("valid_")) return Outcome::kAccepted;
  if (name.starts_with("invalid_")) return Outcome::kRejected;
  return std::nullopt;
}

// Runs a corpus file; true if it met its name's promise and raised no exception.
bool run_corpus_file(const Bytes& input, const std::string& name, bool report) {
  const Outcome outcome = run_one(input, "corpus file " + name, report);
  if (outcome == Outcome::kEscapedException) return false;
  const std::optional<Outcome> promised = promised_outcome(name);
  if (!promised || outcome == *promised) return true;
  if (report) {
    std::fprintf(stderr, "FINDING: corpus file %s was %s, its name says it must be %s\n",
                 name.c_str(), outcome == Outcome::kAccepted ? "accepted" : "rejected",
                 *promised == Outcome::kAccepted ? "accepted" : "rejected");
  }
  return false;
}

bool parse_options(int argc, char** argv, Options& options) {
  if (argc < 2) return false;
  options.corpus_dir = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (i + 1 >= argc) return false;
    if (flag == "--mutations") {
      options.mutations = std::stoull(argv[++i]);
    } else if (flag == "--seed") {
      options.seed = std::stoull(argv[++i]);
    } else {
      return false;
    }
  }
  return true;
}

// Corpus files in name order, so that mutation numbers are stable.
std::vector<Bytes> read_corpus(const std::filesystem::path& dir, std::vector<std::string>& names) {
  std::vector<std::filesystem::path> paths;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.is_regular_file()) paths.push_back(entry.path());
  }
  std::sort(paths.begin(), paths.end());
  std::vector<Bytes> corpus;
  for (const std::filesystem::path& path : paths) {
    std::ifstream file(path, std::ios::binary);
    Bytes bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (bytes.size() > kMaxInputBytes) bytes.resize(kMaxInputBytes);
    corpus.push_back(std::move(bytes));
    names.push_back(path.filename().string());
  }
  return corpus;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    if (!parse_options(argc, argv, options)) {
      std::fprintf(stderr, "usage: %s CORPUS_DIR [--mutations N] [--seed S]\n", argv[0]);
      return 2;
    }
  } catch (const std::exception&) {
    std::fprintf(stderr, "%s: --mutations and --seed take unsigned integers\n", argv[0]);
    return 2;
  }
  std::vector<std::string> names;
  std::vector<Bytes> corpus;
  try {
    corpus = read_corpus(options.corpus_dir, names);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s: cannot read corpus: %s\n", argv[0], error.what());
    return 2;
  }
  if (corpus.empty()) {
    std::fprintf(stderr, "%s: corpus %s is empty\n", argv[0], options.corpus_dir.c_str());
    return 2;
  }

  uint64_t findings = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    if (!run_corpus_file(corpus[i], names[i], findings < kFindingsReported)) ++findings;
  }
  Rng rng(options.seed);
  for (uint64_t m = 0; m < options.mutations; ++m) {
    const std::string origin =
        "mutation " + std::to_string(m) + " (seed " + std::to_string(options.seed) + ")";
    if (run_one(mutate(corpus, rng), origin, findings < kFindingsReported) ==
        Outcome::kEscapedException) {
      ++findings;
    }
  }
  const uint64_t inputs = uint64_t{corpus.size()} + options.mutations;
  std::printf("%s: %llu inputs (%zu corpus files, %llu mutations), %llu findings\n", argv[0],
              static_cast<unsigned long long>(inputs), corpus.size(),
              static_cast<unsigned long long>(options.mutations),
              static_cast<unsigned long long>(findings));
  return findings == 0 ? 0 : 1;
}
