// BPE from a Hugging Face tokenizer.json, implemented here and checked against the `tokenizers`
// library on committed vectors (tests/data/tokenizers): byte-level (LLaMA-3, Qwen2, GPT-2 style)
// and SentencePiece-style (Llama 2, Mistral, TinyLlama conversions: tokens are text pieces such as
// "▁the", and a character without a token becomes the "<0xXX>" tokens of its UTF-8 bytes).
//
// What is supported, exactly as the tokenizers library does it:
//   - normalizer: NFC, NFD, NFKC, NFKD, Lowercase, Replace (String or Regex), Prepend, and a
//     Sequence of them (normalizer.h), applied to the text between added tokens;
//   - model: type "BPE", vocab, merges as "a b" strings or ["a", "b"] pairs (merges apply by rank,
//     lowest first, leftmost on ties), ignore_merges, unk_token and fuse_unk, byte_fallback (a
//     byte whose byte-level character is missing becomes that character's <0xXX> tokens; without
//     ByteLevel, a character missing from the vocabulary becomes its bytes' <0xXX> tokens);
//   - pre_tokenizer: ByteLevel (use_regex: the GPT-2 pattern; add_prefix_space), or a Sequence of
//     Split (any String or Regex pattern, taken verbatim and run by Oniguruma as the library does;
//     every behavior; invert), Whitespace and WhitespaceSplit steps followed by ByteLevel; without
//     ByteLevel (SentencePiece style): none (null), Metaspace (replacement, prepend_scheme always,
//     first or never, split, legacy add_prefix_space), or a Sequence of Split, Whitespace,
//     WhitespaceSplit and Metaspace steps;
//   - added_tokens (special or not) matched in the text before pre-tokenisation, leftmost-longest,
//     with lstrip/rstrip; tokens with normalized=false first on the raw text, then those with
//     normalized=true, in their normalized spelling, on the normalized text;
//   - decoder: ByteLevel with a ByteLevel pre-tokenizer; otherwise Replace, ByteFallback, Fuse,
//     Strip, Metaspace and a Sequence of them (token_decoder.h).
// Everything else (another normalizer or pre-tokenizer, dropout, another model or decoder, a
// decoder that does not fit the pre-tokenizer, single_word added tokens, ...) is rejected with an
// error naming the field; so is a regex that does not compile, with Oniguruma's message.
// post_processor is ignored (encode adds no BOS/EOS), as are truncation and padding (callers cut
// and pad).
//
// Text that is not valid UTF-8 (which the tokenizers library refuses) is encoded byte by byte:
// each ill-formed byte is a one-byte character of class "other", so it survives as a byte token
// (SentencePiece style: its <0xXX> token where byte_fallback has one, which decodes to U+FFFD).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "worker/data/tokenizer.h"

namespace lomo {

class BpeTokenizer final : public Tokenizer {
 public:
  // Parses tokenizer.json text. `source` names the file in messages. Throws std::invalid_argument
  // (naming source and field) for malformed JSON and for anything unsupported; nothing else.
  static std::unique_ptr<BpeTokenizer> from_json(std::string_view json_text,
                                                 const std::string& source);
  // Reads and parses a tokenizer.json file; std::runtime_error if it cannot be read.
  static std::unique_ptr<BpeTokenizer> load(const std::filesystem::path& path);

  ~BpeTokenizer() override;

  // Throws only std::length_error, for a single pre-tokenized word over 2 GB.
  std::vector<int32_t> encode(std::string_view text) const override;
  std::vector<int32_t> encode_continuation(std::string_view text,
                                           int32_t previous_id) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  int64_t vocab_size() const override;
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  // True for a vocabulary of text pieces whose normalizer has a Prepend step or whose Metaspace
  // prepends (scheme "always" or "first": encode() is always the start of its text).
  bool adds_dummy_prefix() const override;

  // The token's text as tokenizer.json spells it (byte-level characters: "Ġthe" for " the").
  std::optional<std::string> id_to_token(int32_t id) const;

  struct Model;  // the parsed tokenizer.json; defined in bpe_tokenizer.cc

 private:
  explicit BpeTokenizer(std::unique_ptr<const Model> model);

  std::unique_ptr<const Model> model_;
};

}  // namespace lomo
