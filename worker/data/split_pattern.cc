#include "worker/data/split_pattern.h"

#include <oniguruma.h>

#include <mutex>
#include <stdexcept>

#include "worker/data/unicode_text.h"

namespace lomo {
namespace {

const UChar* bytes_of(std::string_view text) { return reinterpret_cast<const UChar*>(text.data()); }

void initialize_oniguruma() {
  static std::once_flag once;
  std::call_once(once, [] {
    OnigEncoding encodings[] = {ONIG_ENCODING_UTF8};
    onig_initialize(encodings, 1);
  });
}

// Ill-formed bytes become U+E000 + byte: three bytes of private use. `offsets[i]` is the
// position in the original text of byte i of the result (and of its end, at offsets[size]).
std::string with_placeholders(std::string_view text, std::vector<size_t>& offsets) {
  std::string out;
  offsets.clear();
  for (size_t at = 0; at < text.size();) {
    const Utf8Char c = decode_utf8(text, at);
    const size_t before = out.size();
    if (c.code_point == kInvalidCodePoint) {
      append_utf8(0xE000 + static_cast<uint8_t>(text[at]), out);
    } else {
      out.append(text.substr(at, c.length));
    }
    for (size_t i = before; i < out.size(); ++i) offsets.push_back(at);
    at += c.length;
  }
  offsets.push_back(text.size());
  return out;
}

bool is_valid_utf8(std::string_view text) {
  for (size_t at = 0; at < text.size();) {
    if (static_cast<uint8_t>(text[at]) < 0x80) {
      ++at;
      continue;
    }
    const Utf8Char c = decode_utf8(text, at);
    if (c.code_point == kInvalidCodePoint) return false;
    at += c.length;
  }
  return true;
}

size_t char_length_at(std::string_view text, size_t at) {
  return at < text.size() ? decode_utf8(text, at).length : 1;
}

}  // namespace

TokenizerRegex::TokenizerRegex(std::string_view pattern) : pattern_(pattern) {
  initialize_oniguruma();
  regex_t* regex = nullptr;
  OnigErrorInfo info;
  const int status = onig_new(&regex, bytes_of(pattern_), bytes_of(pattern_) + pattern_.size(),
                              ONIG_OPTION_NONE, ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &info);
  if (status != ONIG_NORMAL) {
    UChar message[ONIG_MAX_ERROR_MESSAGE_LEN];
    onig_error_code_to_str(message, status, &info);
    throw std::invalid_argument("regex \"" + pattern_ +
                                "\" does not compile: " + reinterpret_cast<const char*>(message));
  }
  regex_ = regex;
}

TokenizerRegex::~TokenizerRegex() { onig_free(static_cast<regex_t*>(regex_)); }

std::unique_ptr<TokenizerRegex> TokenizerRegex::literal(std::string_view literal) {
  // As the library does (regex::escape, then onig): regex metacharacters escaped, the rest kept.
  std::string escaped;
  for (const char ch : literal) {
    const auto byte = static_cast<uint8_t>(ch);
    if (byte < 0x80 && std::string_view("\\.+*?()|[]{}^$#&-~").find(ch) != std::string::npos) {
      escaped += '\\';
    }
    escaped += ch;
  }
  return std::make_unique<TokenizerRegex>(escaped);
}

void TokenizerRegex::find_all(std::string_view text, std::vector<ByteRange>& matches) const {
  matches.clear();
  if (is_valid_utf8(text)) {
    search_valid(text, matches);
    return;
  }
  std::vector<size_t> offsets;
  const std::string placeheld = with_placeholders(text, offsets);
  search_valid(placeheld, matches);
  for (ByteRange& match : matches) match = {offsets[match.first], offsets[match.second]};
}

void TokenizerRegex::search_valid(std::string_view text, std::vector<ByteRange>& matches) const {
  auto* regex = static_cast<regex_t*>(regex_);
  OnigRegion* region = onig_region_new();
  const UChar* begin = bytes_of(text);
  const UChar* end = begin + text.size();
  size_t search_from = 0;
  bool matched_before = false;
  size_t last_match_end = 0;
  while (search_from <= text.size()) {
    onig_region_clear(region);
    // Split patterns cover most text, so the next match usually starts where the search does:
    // trying that position alone first is the same leftmost match, without onig_search's
    // per-call setup (1.8x faster on the Llama 3 pattern); the search runs only when it fails.
    const UChar* at = begin + search_from;
    if (onig_match(regex, begin, end, at, region, ONIG_OPTION_NONE) < 0 &&
        onig_search(regex, begin, end, at, end, region, ONIG_OPTION_NONE) < 0) {
      break;  // ONIG_MISMATCH, or an error (retry-limit) which ends the search
    }
    const auto start = static_cast<size_t>(region->beg[0]);
    const auto stop = static_cast<size_t>(region->end[0]);
    if (start == stop && matched_before && last_match_end == stop) {
      search_from += char_length_at(text, search_from);
      continue;
    }
    search_from = stop;
    matched_before = true;
    last_match_end = stop;
    matches.emplace_back(start, stop);
  }
  onig_region_free(region, 1);
}

}  // namespace lomo
