#include "common/printable.h"

#include <algorithm>
#include <cstdio>

namespace lomo {

namespace {

// The length of the well-formed UTF-8 sequence at text[i] (RFC 3629: no overlongs, surrogates or
// code points above U+10FFFF), or 0 when the bytes there are not one.
size_t utf8_sequence(std::string_view text, size_t i, uint32_t* code_point) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[i + k]); };
  const unsigned char lead = byte(0);
  if (lead < 0x80) {
    *code_point = lead;
    return 1;
  }
  size_t length = 0;
  uint32_t value = 0, min = 0;
  if ((lead & 0xe0) == 0xc0) {
    length = 2, value = lead & 0x1fu, min = 0x80;
  } else if ((lead & 0xf0) == 0xe0) {
    length = 3, value = lead & 0x0fu, min = 0x800;
  } else if ((lead & 0xf8) == 0xf0) {
    length = 4, value = lead & 0x07u, min = 0x10000;
  } else {
    return 0;
  }
  if (i + length > text.size()) return 0;
  for (size_t k = 1; k < length; ++k) {
    if ((byte(k) & 0xc0) != 0x80) return 0;
    value = (value << 6) | (byte(k) & 0x3fu);
  }
  if (value < min || value > 0x10ffff || (value >= 0xd800 && value <= 0xdfff)) return 0;
  *code_point = value;
  return length;
}

void append_escape(std::string& out, uint32_t value, const char* format) {
  char code[12];
  std::snprintf(code, sizeof(code), format, static_cast<unsigned>(value));
  out += code;
}

}  // namespace

std::string printable_excerpt(std::string_view text, size_t max_bytes) {
  size_t end = std::min(text.size(), max_bytes);
  // Back off over UTF-8 continuation bytes so that the cut falls between characters.
  while (end > 0 && end < text.size() && (static_cast<unsigned char>(text[end]) & 0xc0u) == 0x80u) {
    --end;
  }
  std::string out;
  for (size_t i = 0; i < end;) {
    uint32_t code_point = 0;
    const size_t length = utf8_sequence(text.substr(0, end), i, &code_point);
    if (length == 0) {  // not UTF-8: the byte as it is, escaped
      append_escape(out, static_cast<unsigned char>(text[i]), "\\x%02x");
      ++i;
    } else if (code_point < 0x20 || code_point == 0x7f) {
      append_escape(out, code_point, "\\x%02x");
      i += length;
    } else if (code_point >= 0x80 && code_point <= 0x9f) {  // C1 controls (CSI 0x9b among them)
      append_escape(out, code_point, "\\u%04x");
      i += length;
    } else {
      out.append(text.substr(i, length));
      i += length;
    }
  }
  if (end < text.size()) out += "...";
  return out;
}

std::string terminal_line(std::string_view text) {
  std::string out;
  size_t start = 0;
  for (size_t tab = text.find('\t'); tab != std::string_view::npos; tab = text.find('\t', start)) {
    out += printable_excerpt(text.substr(start, tab - start), tab - start) + "\t";
    start = tab + 1;
  }
  return out + printable_excerpt(text.substr(start), text.size() - start);
}

std::string valid_utf8(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    uint32_t code_point = 0;
    const size_t length = utf8_sequence(text, i, &code_point);
    if (length == 0) {
      out += "\xef\xbf\xbd";  // U+FFFD REPLACEMENT CHARACTER
      ++i;
    } else {
      out.append(text.substr(i, length));
      i += length;
    }
  }
  return out;
}

}  // namespace lomo
