// Fuzzes the pieces of tokenizer.json that compile and run text given by the file: Oniguruma
// patterns (Split pre-tokenizers, Replace normalizers) and the normalizers. The input is a
// pattern, a newline, and a text. A pattern may be rejected only with std::invalid_argument; one
// that compiles must yield ordered matches inside the text on character boundaries, the literal
// pattern of any well-formed text must match exactly that text, and normalizing well-formed text
// must give well-formed text. Anything else (a crash, a sanitizer report) is a finding.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "worker/data/normalizer.h"
#include "worker/data/split_pattern.h"
#include "worker/data/unicode_text.h"

namespace {

bool well_formed(std::string_view text) { return lomo::utf8_lossy(text) == text; }

bool on_boundary(std::string_view text, size_t at) {
  return at == text.size() || (static_cast<uint8_t>(text[at]) & 0xC0) != 0x80;
}

void check_matches(const lomo::TokenizerRegex& regex, std::string_view text) {
  std::vector<lomo::ByteRange> matches;
  regex.find_all(text, matches);
  size_t previous = 0;
  for (const auto& [start, stop] : matches) {
    if (start < previous || stop < start || stop > text.size()) __builtin_trap();
    if (well_formed(text) && (!on_boundary(text, start) || !on_boundary(text, stop))) {
      __builtin_trap();
    }
    previous = stop;
  }
}

void check_literal(std::string_view text) {
  if (text.empty() || !well_formed(text)) return;
  std::vector<lomo::ByteRange> matches;
  lomo::TokenizerRegex::literal(text)->find_all(text, matches);
  if (matches.size() != 1 || matches[0] != lomo::ByteRange{0, text.size()}) __builtin_trap();
}

void check_normalize(const std::shared_ptr<const lomo::TokenizerRegex>& regex,
                     std::string_view text) {
  using Kind = lomo::NormalizerStep::Kind;
  const std::vector<lomo::NormalizerStep> steps = {{Kind::kReplace, regex, "<>"},
                                                   {Kind::kNfkc, nullptr, {}},
                                                   {Kind::kLowercase, nullptr, {}},
                                                   {Kind::kNfd, nullptr, {}},
                                                   {Kind::kPrepend, nullptr, "_"}};
  const std::string normalized = lomo::normalize(steps, text);
  if (well_formed(text) && !well_formed(normalized)) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t newline = input.find('\n');
  // Short inputs keep Oniguruma's backtracking (bounded by its retry limit) fast.
  if (newline == std::string_view::npos || newline > 64 || size - newline > 256) return -1;
  const std::string_view pattern = input.substr(0, newline);
  const std::string_view text = input.substr(newline + 1);
  check_literal(pattern);
  check_literal(text);
  std::shared_ptr<const lomo::TokenizerRegex> regex;
  try {
    regex = std::make_shared<const lomo::TokenizerRegex>(pattern);
  } catch (const std::invalid_argument&) {
    return -1;  // the documented rejection
  }
  check_matches(*regex, text);
  check_normalize(regex, text);
  return 0;
}
