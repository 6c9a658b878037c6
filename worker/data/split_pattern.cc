#include "worker/data/split_pattern.h"

#include <cstddef>
#include <cstdint>

#include "worker/data/unicode_text.h"

namespace lomo {
namespace {

constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|)"
    R"( ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct Char {
  uint32_t code_point;
  CharClass char_class;
  size_t offset;  // byte offset in the text
};

// The text as characters, plus a sentinel at text.size() so that scanners may read one past the
// last character (the sentinel's class matches nothing).
std::vector<Char> decode_chars(std::string_view text) {
  std::vector<Char> chars;
  chars.reserve(text.size() + 1);
  for (size_t at = 0; at < text.size();) {
    const Utf8Char c = decode_utf8(text, at);
    chars.push_back({c.code_point, char_class(c.code_point), at});
    at += c.length;
  }
  chars.push_back({kInvalidCodePoint, CharClass::kOther, text.size()});
  return chars;
}

bool is_line_break(const Char& c) { return c.code_point == '\r' || c.code_point == '\n'; }

// End of the run of characters of class `cls` that starts at `i`.
size_t run_end(const std::vector<Char>& c, size_t i, size_t n, CharClass cls) {
  while (i < n && c[i].char_class == cls) ++i;
  return i;
}

// 's|'t|'re|'ve|'m|'ll|'d at i (c[i] is the apostrophe); returns the match end or 0. With
// `ignore_case`, Oniguruma's case folding also lets U+017F (long s) match 's'.
size_t match_contraction(const std::vector<Char>& c, size_t i, size_t n, bool ignore_case) {
  const auto fold = [ignore_case](uint32_t cp) -> uint32_t {
    if (!ignore_case) return cp;
    if (cp >= 'A' && cp <= 'Z') return cp + ('a' - 'A');
    if (cp == 0x017F) return 's';
    return cp;
  };
  if (i + 1 >= n) return 0;
  const uint32_t a = fold(c[i + 1].code_point);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
  if (i + 2 >= n) return 0;
  const uint32_t b = fold(c[i + 2].code_point);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
  return 0;
}

// \s+(?!\S)|\s+ at i (c[i] is whitespace): the run, less its last character when a non-space
// follows and the run has more than one character (the lookahead's backtrack).
size_t match_trailing_space(const std::vector<Char>& c, size_t i, size_t n) {
  const size_t end = run_end(c, i, n, CharClass::kSpace);
  if (end == n || end - i == 1) return end;
  return end - 1;
}

// One match of the GPT-2 pattern starting at i < n.
size_t match_gpt2(const std::vector<Char>& c, size_t i, size_t n) {
  if (c[i].code_point == '\'') {
    if (const size_t end = match_contraction(c, i, n, /*ignore_case=*/false)) return end;
  }
  // ` ?X+` for X in L, N, other: the optional space binds to a following run of X.
  size_t start = i;
  if (c[i].code_point == ' ' && i + 1 < n && c[i + 1].char_class != CharClass::kSpace) {
    start = i + 1;
  }
  const CharClass cls = c[start].char_class;
  if (cls != CharClass::kSpace) return run_end(c, start, n, cls);
  return match_trailing_space(c, i, n);
}

// One match of the Llama 3 (max_digits 3) or Qwen2 (max_digits 1) pattern starting at i < n.
size_t match_llama3(const std::vector<Char>& c, size_t i, size_t n, size_t max_digits) {
  if (c[i].code_point == '\'') {
    if (const size_t end = match_contraction(c, i, n, /*ignore_case=*/true)) return end;
  }
  const CharClass cls = c[i].char_class;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (cls == CharClass::kLetter) return run_end(c, i, n, CharClass::kLetter);
  if (cls != CharClass::kNumber && !is_line_break(c[i]) && i + 1 < n &&
      c[i + 1].char_class == CharClass::kLetter) {
    return run_end(c, i + 1, n, CharClass::kLetter);
  }
  // \p{N}{1,max_digits}
  if (cls == CharClass::kNumber) {
    size_t end = i + 1;
    while (end < n && end - i < max_digits && c[end].char_class == CharClass::kNumber) ++end;
    return end;
  }
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  size_t start = i;
  if (c[i].code_point == ' ' && i + 1 < n && c[i + 1].char_class == CharClass::kOther) {
    start = i + 1;
  }
  if (c[start].char_class == CharClass::kOther) {
    size_t end = run_end(c, start, n, CharClass::kOther);
    while (end < n && is_line_break(c[end])) ++end;
    return end;
  }
  // c[i] is whitespace. \s*[\r\n]+: backtracking the greedy \s* stops at the last line break of
  // the whitespace run; the match ends right after it.
  const size_t space_end = run_end(c, i, n, CharClass::kSpace);
  for (size_t k = space_end; k > i; --k) {
    if (is_line_break(c[k - 1])) return k;
  }
  return match_trailing_space(c, i, n);
}

}  // namespace

std::optional<SplitPattern> find_split_pattern(std::string_view regex) {
  if (regex == kGpt2Regex) return SplitPattern::kGpt2;
  if (regex == kLlama3Regex) return SplitPattern::kLlama3;
  if (regex == kQwen2Regex) return SplitPattern::kQwen2;
  return std::nullopt;
}

std::string_view split_pattern_regex(SplitPattern pattern) {
  switch (pattern) {
    case SplitPattern::kGpt2:
      return kGpt2Regex;
    case SplitPattern::kLlama3:
      return kLlama3Regex;
    case SplitPattern::kQwen2:
      return kQwen2Regex;
  }
  return {};
}

void split_with_pattern(SplitPattern pattern, std::string_view text,
                        std::vector<std::string_view>& pieces) {
  if (text.empty()) return;
  const std::vector<Char> chars = decode_chars(text);
  const size_t n = chars.size() - 1;  // without the sentinel
  size_t i = 0;
  while (i < n) {
    size_t end;
    switch (pattern) {
      case SplitPattern::kGpt2:
        end = match_gpt2(chars, i, n);
        break;
      case SplitPattern::kLlama3:
        end = match_llama3(chars, i, n, 3);
        break;
      default:
        end = match_llama3(chars, i, n, 1);
        break;
    }
    pieces.push_back(text.substr(chars[i].offset, chars[end].offset - chars[i].offset));
    i = end;
  }
}

}  // namespace lomo
