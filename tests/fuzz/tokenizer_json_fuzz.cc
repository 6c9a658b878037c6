// Fuzzes the tokenizer.json loader. It may reject input only with std::invalid_argument; a
// tokenizer it accepts must encode a fixed text and the input itself (arbitrary bytes, so also
// invalid UTF-8), whole and as a continuation, to ids inside its vocabulary, and decode them to
// valid UTF-8. Anything else (a crash, a sanitizer report, another exception) is a finding.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "tests/fuzz/tokenizer_fuzz_checks.h"
#include "worker/data/bpe_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  std::unique_ptr<lomo::BpeTokenizer> tokenizer;
  try {
    tokenizer = lomo::BpeTokenizer::from_json(input, "fuzz-tokenizer.json");
  } catch (const std::invalid_argument&) {
    return -1;  // the documented rejection
  }
  for (const std::string_view text : {lomo::fuzz::kFuzzText, input}) {
    lomo::fuzz::check_ids(*tokenizer, tokenizer->encode(text));
    lomo::fuzz::check_ids(*tokenizer, tokenizer->encode_continuation(text, 1));
  }
  return 0;
}
