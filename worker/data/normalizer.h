// tokenizer.json normalizers, as Hugging Face tokenizers applies them before pre-tokenisation:
// NFC, NFD, NFKC, NFKD (utf8proc), Lowercase (per character, Unicode's full lowercase mapping),
// Replace (a String or Regex pattern, every match), Prepend (to non-empty text), and Sequence.
// Only the normalized text matters to lomo (no offsets are kept).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "worker/data/split_pattern.h"

namespace lomo {

struct NormalizerStep {
  enum class Kind { kNfc, kNfd, kNfkc, kNfkd, kLowercase, kReplace, kPrepend };
  Kind kind;
  std::shared_ptr<const TokenizerRegex> pattern;  // kReplace
  std::string content;                            // kReplace: the replacement; kPrepend: prefix
};

// The steps in order. Text that is not well-formed UTF-8 is normalized run by run between the
// ill-formed bytes, which pass through unchanged. Without `section_start` (the text continues a
// section begun in text encoded before it) Prepend steps do nothing.
std::string normalize(const std::vector<NormalizerStep>& steps, std::string_view text,
                      bool section_start = true);

}  // namespace lomo
