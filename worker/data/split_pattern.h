// The pre-tokenizer split patterns of byte-level BPE tokenizers, evaluated by hand-written scanners
// (std::regex knows no \p{L} or \p{N}). Each scanner reproduces what Oniguruma, the regex engine
// of Hugging Face tokenizers, matches for that exact pattern: leftmost-first alternation with
// backtracking, Unicode classes as in unicode_text.h.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

namespace lomo {

enum class SplitPattern {
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
  // \s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3,
  // As kLlama3 with \p{N} (single digits) in place of \p{N}{1,3}.
  kQwen2,
};

// The pattern whose regex source is exactly `regex` (as tokenizer.json spells it), if known.
std::optional<SplitPattern> find_split_pattern(std::string_view regex);

// The regex source of a pattern, for messages.
std::string_view split_pattern_regex(SplitPattern pattern);

// Appends to `pieces` the successive matches of `pattern` in `text`. The matches of every
// supported pattern cover the text without gaps, so the pieces concatenate back to `text`. Bytes
// that are not well-formed UTF-8 count as one-byte characters of class "other" (punctuation-like).
void split_with_pattern(SplitPattern pattern, std::string_view text,
                        std::vector<std::string_view>& pieces);

}  // namespace lomo
