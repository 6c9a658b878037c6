// Fuzzes the text escaping that stands between untrusted bytes (job names, reasons, trainer
// output) and a terminal or a protobuf string: valid_utf8() must give well-formed UTF-8 that keeps
// every valid input unchanged, and printable_excerpt()/terminal_line() nothing a terminal acts on
// (no C0 byte but tab in terminal_line, no DEL, no C1 control, no invalid UTF-8).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/printable.h"

namespace {

void require(bool condition) {
  if (!condition) std::abort();
}

// No byte a terminal would act on, and well-formed UTF-8 (valid_utf8 leaves it as it is).
void require_inert(const std::string& text, bool tabs_allowed) {
  require(lomo::valid_utf8(text) == text);
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    require(c >= 0x20 || (tabs_allowed && c == '\t'));
    require(c != 0x7f);
    require(!(c == 0xc2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) >= 0x80 &&
              static_cast<unsigned char>(text[i + 1]) <= 0x9f));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::string valid = lomo::valid_utf8(input);
  require(lomo::valid_utf8(valid) == valid);
  require(valid.size() >= input.size());
  const bool was_valid = valid == input;
  require_inert(lomo::printable_excerpt(input, size), false);
  require_inert(lomo::printable_excerpt(input, size / 2), false);
  require_inert(lomo::terminal_line(input), true);
  return was_valid ? 0 : -1;
}
