// tokenizer.json decoders for vocabularies of text pieces (SentencePiece-style BPE: Llama 2,
// Mistral, TinyLlama), as Hugging Face tokenizers applies them to the tokens of the ids being
// decoded: Replace, ByteFallback, Fuse, Strip, Metaspace, and a Sequence of them. Byte-level
// BPE's ByteLevel decoder works on bytes and stays in bpe_tokenizer.cc.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "worker/data/split_pattern.h"

namespace lomo {

struct DecoderStep {
  enum class Kind { kReplace, kByteFallback, kFuse, kStrip, kMetaspace };
  Kind kind = Kind::kFuse;
  std::shared_ptr<const TokenizerRegex> pattern;  // kReplace
  // kReplace: the replacement; kStrip: the one character stripped; kMetaspace: the replacement
  // character that stands for a space.
  std::string content;
  size_t start = 0;  // kStrip: at most this many `content` characters cut from each token's start
  size_t stop = 0;   // kStrip: ... and from its end
  // kMetaspace: prepend_scheme is not "never", so the first token loses its replacement
  // characters instead of turning them into spaces (they were the prepended ones).
  bool first_token_unprefixed = false;
};

// The text of `tokens` (each the vocabulary spelling of one id) after `steps`, joined: the
// library's Decoder::decode. Always valid UTF-8: "<0xXX>" tokens that do not form UTF-8 give one
// U+FFFD each, as ByteFallback does.
std::string decode_tokens(const std::vector<DecoderStep>& steps, std::vector<std::string> tokens);

}  // namespace lomo
