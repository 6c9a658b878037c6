// Fuzzes the tokenizer.json loader. It may reject input only with std::invalid_argument; a
// tokenizer it accepts must encode a fixed text and the input itself (arbitrary bytes, so also
// invalid UTF-8) to ids inside its vocabulary, and decode them to valid UTF-8. Anything else (a
// crash, a sanitizer report, another exception) is a finding.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "worker/data/bpe_tokenizer.h"
#include "worker/data/unicode_text.h"

namespace {

void check_round(const lomo::BpeTokenizer& tokenizer, std::string_view text) {
  const std::vector<int32_t> ids = tokenizer.encode(text);
  for (const int32_t id : ids) {
    if (id < 0 || id >= tokenizer.vocab_size()) __builtin_trap();
  }
  const std::string decoded = tokenizer.decode(ids);
  if (lomo::utf8_lossy(decoded) != decoded) __builtin_trap();  // not valid UTF-8
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  std::unique_ptr<lomo::BpeTokenizer> tokenizer;
  try {
    tokenizer = lomo::BpeTokenizer::from_json(input, "fuzz-tokenizer.json");
  } catch (const std::invalid_argument&) {
    return -1;  // the documented rejection
  }
  check_round(*tokenizer, "Hello, world! It's 2024: ça va? 中文 😀 <|eot_id|>\n\n  x\t'S 12345");
  check_round(*tokenizer, input);
  return 0;
}
