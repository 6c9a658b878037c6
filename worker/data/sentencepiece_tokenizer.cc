// The one translation unit that includes sentencepiece_processor.h (see the header for why).
#include "worker/data/sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>

#include <stdexcept>
#include <utility>

#include "common/read_file.h"
#include "worker/data/unicode_text.h"

namespace lomo {

SentencePieceTokenizer::SentencePieceTokenizer(
    std::unique_ptr<sentencepiece::SentencePieceProcessor> processor, std::string source)
    : processor_(std::move(processor)), source_(std::move(source)) {}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::load(
    const std::filesystem::path& model_file) {
  // Reading the file here keeps "cannot read" (runtime_error) apart from "not a model"
  // (invalid_argument), which SentencePiece's own Load() reports alike.
  const std::string bytes = read_file(model_file);

  auto processor = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const sentencepiece::util::Status status = processor->LoadFromSerializedProto(bytes);
  if (!status.ok()) {
    throw std::invalid_argument(model_file.string() +
                                ": not a SentencePiece model: " + status.ToString());
  }
  auto tokenizer = std::unique_ptr<SentencePieceTokenizer>(
      new SentencePieceTokenizer(std::move(processor), model_file.string()));
  SpecialTokenIds ids;
  const auto defined = [](int id) { return id >= 0 ? std::optional<int32_t>(id) : std::nullopt; };
  ids.bos = defined(tokenizer->processor_->bos_id());
  ids.eos = defined(tokenizer->processor_->eos_id());
  ids.pad = defined(tokenizer->processor_->pad_id());
  tokenizer->set_special_token_ids(ids);
  return tokenizer;
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const sentencepiece::util::Status status = processor_->Encode(text, &ids);
  if (!status.ok()) throw std::runtime_error(source_ + ": encode failed: " + status.ToString());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string SentencePieceTokenizer::decode(std::span<const int32_t> ids) const {
  // SentencePiece fails the whole call on an id outside its vocabulary; the interface promises
  // such ids contribute nothing instead.
  std::vector<int> known;
  known.reserve(ids.size());
  const int size = processor_->GetPieceSize();
  for (const int32_t id : ids) {
    if (id >= 0 && id < size) known.push_back(id);
  }
  std::string text;
  const sentencepiece::util::Status status = processor_->Decode(known, &text);
  if (!status.ok()) throw std::runtime_error(source_ + ": decode failed: " + status.ToString());
  // Byte pieces (<0x..>) may spell incomplete UTF-8; keep the promise of valid UTF-8.
  return utf8_lossy(text);
}

int64_t SentencePieceTokenizer::vocab_size() const { return processor_->GetPieceSize(); }

std::optional<int32_t> SentencePieceTokenizer::token_to_id(std::string_view token) const {
  // PieceToId answers the unknown token's id for any piece it does not have.
  const int id = processor_->PieceToId(token);
  if (id < 0 || (processor_->IsUnknown(id) && processor_->IdToPiece(id) != token)) {
    return std::nullopt;
  }
  return id;
}

}  // namespace lomo
