// The one translation unit that includes sentencepiece_processor.h (see the header for why).
#include "worker/data/sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/read_file.h"
#include "worker/data/unicode_text.h"

namespace lomo {
namespace {

// Protocol buffer wire format, as much as rewriting one field of a ModelProto needs. The bytes
// were accepted by libsentencepiece first, so they are a well-formed proto; every read is still
// bounds-checked and a surprise is an error naming the file, never a crash.
struct WireReader {
  std::string_view bytes;
  size_t at = 0;
  const std::string* source;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::invalid_argument(*source + ": SentencePiece model proto at byte " +
                                std::to_string(at) + ": " + what);
  }
  uint64_t varint() {
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (at >= bytes.size()) fail("truncated varint");
      const auto byte = static_cast<uint8_t>(bytes[at++]);
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if ((byte & 0x80) == 0) return value;
    }
    fail("varint longer than 10 bytes");
  }
  // Skips the value of a field of `wire_type`; returns the bytes of a length-delimited one.
  std::string_view value(uint64_t wire_type) {
    const size_t start = at;
    switch (wire_type) {
      case 0:
        varint();
        break;
      case 1:
        at += 8;
        break;
      case 2: {
        const uint64_t length = varint();
        if (length > bytes.size() - at) fail("length beyond the end");
        at += static_cast<size_t>(length);
        return bytes.substr(at - static_cast<size_t>(length), static_cast<size_t>(length));
      }
      case 5:
        at += 4;
        break;
      default:
        fail("wire type " + std::to_string(wire_type));
    }
    if (at > bytes.size()) fail("value beyond the end");
    return bytes.substr(start, at - start);
  }
};

void append_varint(std::string& out, uint64_t value) {
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

// ModelProto field 3 is normalizer_spec (a NormalizerSpec); its field 3 is add_dummy_prefix
// (bool, default true). Both from sentencepiece_model.proto.
constexpr uint64_t kNormalizerSpecField = 3;
constexpr uint64_t kAddDummyPrefixField = 3;

// `normalizer_spec` with every add_dummy_prefix removed and add_dummy_prefix = false appended.
std::string without_dummy_prefix_spec(std::string_view spec, const std::string& source) {
  WireReader in{spec, 0, &source};
  std::string out;
  while (in.at < spec.size()) {
    const size_t field_start = in.at;
    const uint64_t key = in.varint();
    in.value(key & 7);
    if (key >> 3 != kAddDummyPrefixField) out.append(spec.substr(field_start, in.at - field_start));
  }
  append_varint(out, kAddDummyPrefixField << 3 | 0);
  out.push_back('\0');
  return out;
}

// The serialized ModelProto `model` with add_dummy_prefix = false and nothing else changed.
std::string without_dummy_prefix(std::string_view model, const std::string& source) {
  WireReader in{model, 0, &source};
  std::string out;
  bool seen = false;
  while (in.at < model.size()) {
    const size_t field_start = in.at;
    const uint64_t key = in.varint();
    const std::string_view value = in.value(key & 7);
    if (key >> 3 != kNormalizerSpecField || (key & 7) != 2) {
      out.append(model.substr(field_start, in.at - field_start));
      continue;
    }
    const std::string spec = without_dummy_prefix_spec(value, source);
    append_varint(out, key);
    append_varint(out, spec.size());
    out += spec;
    seen = true;
  }
  if (!seen) {  // no normalizer_spec at all: one holding only the flag
    const std::string spec = without_dummy_prefix_spec({}, source);
    append_varint(out, kNormalizerSpecField << 3 | 2);
    append_varint(out, spec.size());
    out += spec;
  }
  return out;
}

std::unique_ptr<sentencepiece::SentencePieceProcessor> load_processor(std::string_view bytes,
                                                                      const std::string& source) {
  auto processor = std::make_unique<sentencepiece::SentencePieceProcessor>();
  sentencepiece::util::Status status;
  try {
    status = processor->LoadFromSerializedProto(bytes);
  } catch (const std::exception& error) {
    // Its bundled darts_clone throws on some malformed models (e.g. an empty piece) instead of
    // returning a status (found by sentencepiece_model_fuzz).
    throw std::invalid_argument(source + ": not a SentencePiece model: " + error.what());
  }
  if (!status.ok()) {
    throw std::invalid_argument(source + ": not a SentencePiece model: " + status.ToString());
  }
  return processor;
}

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(
    std::unique_ptr<sentencepiece::SentencePieceProcessor> processor,
    std::unique_ptr<sentencepiece::SentencePieceProcessor> without_prefix, std::string source)
    : processor_(std::move(processor)),
      without_prefix_(std::move(without_prefix)),
      source_(std::move(source)) {
  for (int id = 0; id < processor_->GetPieceSize(); ++id) {
    const std::string& piece = processor_->IdToPiece(id);
    if (!piece.empty() && (processor_->IsControl(id) || processor_->IsUnknown(id))) {
      specials_.emplace_back(piece, id);
    }
  }
  for (const auto& special : specials_)
    special_start_[static_cast<uint8_t>(special.first[0])] = true;
  // Longest first: where one special is a prefix of another, the longer is the token.
  std::stable_sort(specials_.begin(), specials_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::load(
    const std::filesystem::path& model_file) {
  // Reading the file here keeps "cannot read" (runtime_error) apart from "not a model"
  // (invalid_argument), which SentencePiece's own Load() reports alike.
  return from_bytes(read_file(model_file), model_file.string());
}

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_bytes(
    std::string_view bytes, const std::string& source) {
  auto processor = load_processor(bytes, source);
  auto without_prefix = load_processor(without_dummy_prefix(bytes, source), source);
  auto tokenizer = std::unique_ptr<SentencePieceTokenizer>(
      new SentencePieceTokenizer(std::move(processor), std::move(without_prefix), source));
  SpecialTokenIds ids;
  const auto defined = [](int id) { return id >= 0 ? std::optional<int32_t>(id) : std::nullopt; };
  ids.bos = defined(tokenizer->processor_->bos_id());
  ids.eos = defined(tokenizer->processor_->eos_id());
  ids.pad = defined(tokenizer->processor_->pad_id());
  tokenizer->set_special_token_ids(ids);
  return tokenizer;
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  return encode_sections(text, true);
}

std::vector<int32_t> SentencePieceTokenizer::encode_continuation(std::string_view text,
                                                                 int32_t /*previous_id*/) const {
  return encode_sections(text, false);
}

std::vector<int32_t> SentencePieceTokenizer::encode_sections(std::string_view text,
                                                             bool prefix_first) const {
  std::vector<int32_t> ids;
  bool first = true;
  size_t start = 0;
  for (size_t at = 0; at < text.size();) {
    if (!special_start_[static_cast<uint8_t>(text[at])]) {
      ++at;
      continue;
    }
    const auto special = std::find_if(specials_.begin(), specials_.end(), [&](const auto& s) {
      return text.substr(at).starts_with(s.first);
    });
    if (special == specials_.end()) {
      ++at;
      continue;
    }
    encode_with(first && prefix_first ? *processor_ : *without_prefix_,
                text.substr(start, at - start), ids);
    ids.push_back(special->second);
    at += special->first.size();
    start = at;
    first = false;
  }
  encode_with(first && prefix_first ? *processor_ : *without_prefix_, text.substr(start), ids);
  return ids;
}

void SentencePieceTokenizer::encode_with(const sentencepiece::SentencePieceProcessor& processor,
                                         std::string_view text, std::vector<int32_t>& ids) const {
  if (text.empty()) return;
  std::vector<int> section;
  const sentencepiece::util::Status status = processor.Encode(text, &section);
  if (!status.ok()) throw std::runtime_error(source_ + ": encode failed: " + status.ToString());
  ids.insert(ids.end(), section.begin(), section.end());
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
