// Fuzzes the SentencePiece tokenizer.model loader: libsentencepiece's own parsing, then lomo's
// rewrite of the model proto without the dummy prefix (worker/data/sentencepiece_tokenizer.cc)
// and the split at special pieces. It may reject input only with std::invalid_argument; a model
// it accepts must encode (as a whole text and as a continuation) to ids inside its vocabulary and
// decode them to valid UTF-8. Anything else (a crash, a sanitizer report, another exception) is a
// finding. Seeds: two tiny models trained for this corpus (BPE with byte fallback; unigram without
// the dummy prefix, with a control and a user-defined symbol).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "tests/fuzz/tokenizer_fuzz_checks.h"
#include "worker/data/sentencepiece_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  std::unique_ptr<lomo::SentencePieceTokenizer> tokenizer;
  try {
    tokenizer = lomo::SentencePieceTokenizer::from_bytes(input, "fuzz-tokenizer.model");
  } catch (const std::invalid_argument&) {
    return -1;  // the documented rejection
  }
  for (const std::string_view text : {lomo::fuzz::kFuzzText, input}) {
    lomo::fuzz::check_ids(*tokenizer, tokenizer->encode(text));
    lomo::fuzz::check_ids(*tokenizer, tokenizer->encode_continuation(text, 1));
  }
  return 0;
}
