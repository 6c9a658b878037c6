// SentencePiece tokenizer.model (LLaMA-1/2, Mistral) through libsentencepiece.
//
// encode() is SentencePiece's own encoding with the model's normalizer, so for Llama 2 a "▁" is
// prepended to the text (add_dummy_prefix): encode("Hello") is [15043] ("▁Hello"). As in
// transformers (whose tokenizers split added tokens out of a text before SentencePiece sees it),
// the model's control and unknown pieces written in the text ("<s>", "</s>", "<unk>") are those
// tokens, and the text after one is encoded without the dummy prefix (transformers 5's Llama
// tokenizer: Metaspace "first", non-legacy): "<s> [INST]" is [1, 518, ...], as a chat template
// renders it. encode_continuation() adds no dummy prefix at all: the text goes on inside a whole.
// For that, a second processor runs the same model with add_dummy_prefix off (the model's
// serialized proto with that one field changed). decode() drops the leading space again, and
// control tokens (BOS/EOS) decode to nothing.
//
// This header deliberately does not include sentencepiece_processor.h: that header defines
// absl::string_view itself and clashes with Abseil's headers in one translation unit.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "worker/data/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}  // namespace sentencepiece

namespace lomo {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Loads a tokenizer.model. Throws std::runtime_error if the file cannot be read and
  // std::invalid_argument if it is not a SentencePiece model, naming the file. The special ids
  // start as the model's own BOS/EOS/pad (those it defines).
  static std::unique_ptr<SentencePieceTokenizer> load(const std::filesystem::path& model_file);
  // The same from the file's bytes; `source` names them in messages. Throws
  // std::invalid_argument if they are not a SentencePiece model.
  static std::unique_ptr<SentencePieceTokenizer> from_bytes(std::string_view bytes,
                                                            const std::string& source);

  ~SentencePieceTokenizer() override;

  // Both throw std::runtime_error if SentencePiece reports a failure.
  std::vector<int32_t> encode(std::string_view text) const override;
  std::vector<int32_t> encode_continuation(std::string_view text,
                                           int32_t previous_id) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  int64_t vocab_size() const override;
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  // True: lomo's SentencePiece models (Llama 1/2, Mistral) all prepend "▁" (add_dummy_prefix).
  bool adds_dummy_prefix() const override { return true; }

 private:
  SentencePieceTokenizer(std::unique_ptr<sentencepiece::SentencePieceProcessor> processor,
                         std::unique_ptr<sentencepiece::SentencePieceProcessor> without_prefix,
                         std::string source);
  // `text` split at the special pieces written in it, each section encoded; the first section
  // with the dummy prefix when `prefix_first`, every later one (after a special) without.
  std::vector<int32_t> encode_sections(std::string_view text, bool prefix_first) const;
  void encode_with(const sentencepiece::SentencePieceProcessor& processor, std::string_view text,
                   std::vector<int32_t>& ids) const;

  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> without_prefix_;  // add_dummy_prefix off
  std::vector<std::pair<std::string, int32_t>> specials_;  // control/unknown pieces, longest first
  std::array<bool, 256> special_start_{};                  // the first bytes of specials_
  std::string source_;                                     // the file, for messages
};

}  // namespace lomo
