#include "worker/data/byte_tokenizer.h"

#include "worker/data/unicode_text.h"

namespace lomo {

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(std::span<const int32_t> ids) const {
  std::string bytes;
  bytes.reserve(ids.size());
  for (const int32_t id : ids) {
    if (id >= 0 && id < 256) bytes.push_back(static_cast<char>(id));
  }
  return utf8_lossy(bytes);
}

}  // namespace lomo
