// What every tokenizer loader's fuzz target asks of a tokenizer it accepted (tokenizer_json_fuzz,
// sentencepiece_model_fuzz): ids inside its vocabulary, decoding to valid UTF-8. A violation traps,
// which the fuzzer and the replay driver report as a finding.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "worker/data/tokenizer.h"
#include "worker/data/unicode_text.h"

namespace lomo::fuzz {

inline void check_ids(const Tokenizer& tokenizer, const std::vector<int32_t>& ids) {
  for (const int32_t id : ids) {
    if (id < 0 || id >= tokenizer.vocab_size()) __builtin_trap();
  }
  const std::string decoded = tokenizer.decode(ids);
  if (utf8_lossy(decoded) != decoded) __builtin_trap();  // not valid UTF-8
}

// A fixed text with special-token spellings, scripts, emoji and runs of white space.
inline constexpr std::string_view kFuzzText =
    "Hello, world! It's 2024: ça va? 中文 😀 <|eot_id|><s> [INST]</s><unk>\n\n  x\t'S 12345";

}  // namespace lomo::fuzz
