#include "worker/data/token_decoder.h"

#include <optional>
#include <string_view>
#include <utility>

#include "worker/data/unicode_text.h"

namespace lomo {
namespace {

using Kind = DecoderStep::Kind;
using Tokens = std::vector<std::string>;

constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";  // U+FFFD

void replace(const DecoderStep& step, Tokens& tokens) {
  std::vector<ByteRange> matches;
  for (std::string& token : tokens) {
    step.pattern->find_all(token, matches);
    if (matches.empty()) continue;
    std::string out;
    size_t previous = 0;
    for (const auto& [start, stop] : matches) {
      out.append(token, previous, start - previous);
      out += step.content;
      previous = stop;
    }
    out.append(token, previous);
    token = std::move(out);
  }
}

std::optional<int> hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return std::nullopt;
}

// The byte of a "<0xXX>" token. The library parses the two characters with Rust's
// u8::from_str_radix(.., 16), which takes either case and a leading '+' ("<0x+A>" is 0x0A).
std::optional<uint8_t> byte_of_token(std::string_view token) {
  if (token.size() != 6 || !token.starts_with("<0x") || token.back() != '>') return std::nullopt;
  const std::optional<int> high = token[3] == '+' ? std::optional<int>(0) : hex_digit(token[3]);
  const std::optional<int> low = hex_digit(token[4]);
  if (!high || !low) return std::nullopt;
  return static_cast<uint8_t>(*high * 16 + *low);
}

bool is_valid_utf8(std::string_view bytes) {
  for (size_t at = 0; at < bytes.size();) {
    const Utf8Char c = decode_utf8(bytes, at);
    if (c.code_point == kInvalidCodePoint) return false;
    at += c.length;
  }
  return true;
}

// Runs of byte tokens become their text, or one U+FFFD per byte when they are not UTF-8.
void byte_fallback(Tokens& tokens) {
  Tokens out;
  out.reserve(tokens.size());
  std::string bytes;
  const auto flush = [&out, &bytes] {
    if (bytes.empty()) return;
    if (is_valid_utf8(bytes)) {
      out.push_back(bytes);
    } else {
      out.insert(out.end(), bytes.size(), std::string(kReplacementCharacter));
    }
    bytes.clear();
  };
  for (std::string& token : tokens) {
    if (const std::optional<uint8_t> byte = byte_of_token(token)) {
      bytes += static_cast<char>(*byte);
      continue;
    }
    flush();
    out.push_back(std::move(token));
  }
  flush();
  tokens.swap(out);
}

void fuse(Tokens& tokens) {
  std::string joined;
  for (const std::string& token : tokens) joined += token;
  tokens.clear();
  tokens.push_back(std::move(joined));
}

// Up to step.start leading and step.stop trailing `content` characters removed from each token.
// Where the library would panic (cuts that cross), the token becomes empty.
void strip(const DecoderStep& step, Tokens& tokens) {
  const std::string_view content = step.content;
  for (std::string& token : tokens) {
    std::string_view view = token;
    for (size_t i = 0; i < step.start && view.starts_with(content); ++i) {
      view.remove_prefix(content.size());
    }
    for (size_t i = 0; i < step.stop && view.ends_with(content); ++i) {
      view.remove_suffix(content.size());
    }
    token = std::string(view);
  }
}

void metaspace(const DecoderStep& step, Tokens& tokens) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string_view replacement = step.content;
    const std::string_view space = i == 0 && step.first_token_unprefixed ? "" : " ";
    std::string& token = tokens[i];
    std::string out;
    for (size_t at = 0; at < token.size();) {
      if (std::string_view(token).substr(at).starts_with(replacement)) {
        out += space;
        at += replacement.size();
      } else {
        out += token[at++];
      }
    }
    token = std::move(out);
  }
}

}  // namespace

std::string decode_tokens(const std::vector<DecoderStep>& steps, Tokens tokens) {
  for (const DecoderStep& step : steps) {
    switch (step.kind) {
      case Kind::kReplace:
        replace(step, tokens);
        break;
      case Kind::kByteFallback:
        byte_fallback(tokens);
        break;
      case Kind::kFuse:
        fuse(tokens);
        break;
      case Kind::kStrip:
        strip(step, tokens);
        break;
      case Kind::kMetaspace:
        metaspace(step, tokens);
        break;
    }
  }
  std::string text;
  for (const std::string& token : tokens) text += token;
  // Tokens are JSON strings (valid UTF-8) and every step keeps valid text valid: a guard only.
  return utf8_lossy(text);
}

}  // namespace lomo
