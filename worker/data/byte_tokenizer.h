// Bytes as tokens: each byte of the text is one token whose id is the byte's value (0-255). This
// is the "bytes" tokenizer kind of the job spec, for models with vocab_size >= 256 and no
// tokenizer files (the tiny demo and test models).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "worker/data/tokenizer.h"

namespace lomo {

// No BOS, EOS or pad token, and no named tokens: token_to_id always answers nullopt, so chat
// templates (which need special tokens) cannot be used with it.
class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text) const override;
  // The bytes of ids in [0, 256), other ids dropped, as valid UTF-8 (ill-formed bytes → U+FFFD).
  std::string decode(std::span<const int32_t> ids) const override;
  int64_t vocab_size() const override { return 256; }
  std::optional<int32_t> token_to_id(std::string_view) const override { return std::nullopt; }
};

}  // namespace lomo
