#include "worker/data/unicode_text.h"

namespace lomo {
namespace {

struct Scan {
  uint32_t code_point;  // kInvalidCodePoint when ill-formed
  size_t length;        // of the character, or of the maximal ill-formed subpart (>= 1)
};

bool in_range(uint8_t byte, uint8_t low, uint8_t high) { return byte >= low && byte <= high; }

// The Unicode table of well-formed byte sequences (Table 3-7): the allowed range of the second
// byte depends on the first; later bytes are 80..BF.
Scan scan_utf8(std::string_view text, size_t at) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  const uint8_t lead = byte(at);
  if (lead < 0x80) return {lead, 1};
  size_t need;
  uint8_t second_low = 0x80;
  uint8_t second_high = 0xBF;
  uint32_t code_point;
  if (in_range(lead, 0xC2, 0xDF)) {
    need = 1;
    code_point = lead & 0x1Fu;
  } else if (in_range(lead, 0xE0, 0xEF)) {
    need = 2;
    code_point = lead & 0x0Fu;
    if (lead == 0xE0) second_low = 0xA0;   // no overlong forms
    if (lead == 0xED) second_high = 0x9F;  // no surrogates
  } else if (in_range(lead, 0xF0, 0xF4)) {
    need = 3;
    code_point = lead & 0x07u;
    if (lead == 0xF0) second_low = 0x90;   // no overlong forms
    if (lead == 0xF4) second_high = 0x8F;  // nothing above U+10FFFF
  } else {
    return {kInvalidCodePoint, 1};
  }
  for (size_t k = 1; k <= need; ++k) {
    const bool ok =
        at + k < text.size() && (k == 1 ? in_range(byte(at + k), second_low, second_high)
                                        : in_range(byte(at + k), 0x80, 0xBF));
    if (!ok) return {kInvalidCodePoint, k};
    code_point = (code_point << 6) | (byte(at + k) & 0x3Fu);
  }
  return {code_point, need + 1};
}

}  // namespace

Utf8Char decode_utf8(std::string_view text, size_t at) {
  const Scan scan = scan_utf8(text, at);
  if (scan.code_point == kInvalidCodePoint) return {kInvalidCodePoint, 1};
  return {scan.code_point, static_cast<uint32_t>(scan.length)};
}

bool is_white_space(uint32_t code_point) {
  // Unicode 15's White_Space property: Rust's char::is_whitespace, and the same set as
  // Oniguruma's \s (so added tokens' lstrip/rstrip agree with the split patterns).
  switch (code_point) {
    case 0x20:
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return (code_point >= 0x09 && code_point <= 0x0D) ||
             (code_point >= 0x2000 && code_point <= 0x200A);
  }
}

void append_utf8(uint32_t code_point, std::string& out) {
  if (code_point < 0x80) {
    out += static_cast<char>(code_point);
  } else if (code_point < 0x800) {
    out += static_cast<char>(0xC0 | (code_point >> 6));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  } else if (code_point < 0x10000) {
    out += static_cast<char>(0xE0 | (code_point >> 12));
    out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (code_point >> 18));
    out += static_cast<char>(0x80 | ((code_point >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (code_point & 0x3F));
  }
}

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t at = 0;
  while (at < bytes.size()) {
    const Scan scan = scan_utf8(bytes, at);
    if (scan.code_point == kInvalidCodePoint) {
      out += "\xEF\xBF\xBD";  // U+FFFD
    } else {
      out.append(bytes.substr(at, scan.length));
    }
    at += scan.length;
  }
  return out;
}

std::string_view strip_white_space(std::string_view text) {
  size_t begin = 0;
  while (begin < text.size()) {
    const Utf8Char c = decode_utf8(text, begin);
    if (!is_white_space(c.code_point)) break;
    begin += c.length;
  }
  // From the end: find the last character that is not white space by scanning forward, since
  // UTF-8 cannot be decoded backwards without re-synchronising.
  size_t end = begin;
  for (size_t at = begin; at < text.size();) {
    const Utf8Char c = decode_utf8(text, at);
    at += c.length;
    if (!is_white_space(c.code_point)) end = at;
  }
  return text.substr(begin, end - begin);
}

}  // namespace lomo
