// SentencePiece tokenizer.model (LLaMA-1/2, Mistral) through libsentencepiece.
//
// encode() is SentencePiece's own encoding: with the model's normalizer, so for Llama 2 a "▁" is
// prepended to the text (add_dummy_prefix) exactly as Hugging Face's Llama tokenizer does for a
// text's first piece: encode("Hello") is [15043] ("▁Hello"). Strings such as "<s>" in the text are
// not special here (SentencePiece encodes them as ordinary text); a pipeline places BOS/EOS by id.
// decode() drops that leading space again, and control tokens (BOS/EOS) decode to nothing.
//
// This header deliberately does not include sentencepiece_processor.h: that header defines
// absl::string_view itself and clashes with Abseil's headers in one translation unit.
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

  ~SentencePieceTokenizer() override;

  // Both throw std::runtime_error if SentencePiece reports a failure.
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  int64_t vocab_size() const override;
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  // True: lomo's SentencePiece models (Llama 1/2, Mistral) all prepend "▁" (add_dummy_prefix).
  bool adds_dummy_prefix() const override { return true; }

 private:
  explicit SentencePieceTokenizer(std::unique_ptr<sentencepiece::SentencePieceProcessor> processor,
                                  std::string source);

  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::string source_;  // the file, for messages
};

}  // namespace lomo
