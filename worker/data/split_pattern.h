// The regexes of tokenizer.json (Split pre-tokenizers, Replace normalizers, ByteLevel's own
// split), run by Oniguruma, the engine Hugging Face tokenizers uses (through the Rust onig crate):
// the same syntax (Oniguruma's default), Unicode classes and leftmost-first backtracking, so a
// pattern copied verbatim from the file matches what the library matches.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lomo {

// ByteLevel's split (use_regex: true), GPT-2's pattern.
inline constexpr std::string_view kGpt2SplitPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A byte range [first, second) of a text.
using ByteRange = std::pair<size_t, size_t>;

class TokenizerRegex {
 public:
  // Compiles `pattern` (UTF-8). Throws std::invalid_argument with Oniguruma's message when the
  // pattern does not compile; callers prefix the file and field.
  explicit TokenizerRegex(std::string_view pattern);
  ~TokenizerRegex();
  TokenizerRegex(const TokenizerRegex&) = delete;
  TokenizerRegex& operator=(const TokenizerRegex&) = delete;

  // A regex matching `literal` exactly (tokenizer.json's {"String": ...} patterns).
  static std::unique_ptr<TokenizerRegex> literal(std::string_view literal);

  // Sets `matches` to the successive matches in `text`, as the onig crate's find_iter yields
  // them (the search restarts at the end of each match; an empty match right where the last one
  // ended is skipped by one character). Thread-safe. Bytes that are not well-formed UTF-8 (which
  // the library refuses) are matched as if each were a private-use character (class "other":
  // not \p{L}, \p{N} or \s), so any byte string splits.
  void find_all(std::string_view text, std::vector<ByteRange>& matches) const;

  const std::string& pattern() const { return pattern_; }

 private:
  void search_valid(std::string_view text, std::vector<ByteRange>& matches) const;

  std::string pattern_;
  void* regex_;  // regex_t*: oniguruma.h stays out of this header
};

}  // namespace lomo
