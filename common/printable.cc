#include "common/printable.h"

#include <algorithm>
#include <cstdio>

namespace lomo {

std::string printable_excerpt(std::string_view text, size_t max_bytes) {
  size_t end = std::min(text.size(), max_bytes);
  // Back off over UTF-8 continuation bytes so that the cut falls between characters.
  while (end > 0 && end < text.size() && (static_cast<unsigned char>(text[end]) & 0xc0u) == 0x80u) {
    --end;
  }
  std::string out;
  for (size_t i = 0; i < end; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f) {
      char code[5];
      std::snprintf(code, sizeof(code), "\\x%02x", c);
      out += code;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (end < text.size()) out += "...";
  return out;
}

}  // namespace lomo
