// UTF-8 decoding and encoding, and the White_Space property. Character classes of the
// pre-tokenizer patterns are Oniguruma's own (split_pattern.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace lomo {

// One decoded character of a UTF-8 string.
struct Utf8Char {
  // The code point, or kInvalidCodePoint for a byte that does not start a well-formed sequence.
  uint32_t code_point;
  // Bytes the character occupies: 1..4; an invalid byte is a character of length 1.
  uint32_t length;
};

inline constexpr uint32_t kInvalidCodePoint = 0xFFFFFFFFu;

// Decodes the character at text[at] (at < text.size()). Strict UTF-8: overlong forms, surrogates
// and code points above U+10FFFF are invalid, so that any byte string splits into characters the
// same way everywhere.
Utf8Char decode_utf8(std::string_view text, size_t at);

// Unicode's White_Space property (what Rust's char::is_whitespace and regex \s accept).
bool is_white_space(uint32_t code_point);

// `text` without leading and trailing Unicode white space (Python's str.strip, Jinja's trim);
// ill-formed bytes are not white space.
std::string_view strip_white_space(std::string_view text);

// Appends the UTF-8 encoding of a code point (<= U+10FFFF, not a surrogate).
void append_utf8(uint32_t code_point, std::string& out);

// `bytes` as valid UTF-8: each maximal ill-formed subsequence becomes U+FFFD, the rule of Rust's
// String::from_utf8_lossy (and Unicode's recommended practice), which the tokenizers library's
// decoders apply.
std::string utf8_lossy(std::string_view bytes);

}  // namespace lomo
