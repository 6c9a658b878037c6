#include "worker/data/normalizer.h"

#include <utf8proc.h>

#include <cstdlib>
#include <stdexcept>

#include "worker/data/unicode_text.h"

namespace lomo {
namespace {

using Kind = NormalizerStep::Kind;

std::string utf8proc_form(std::string_view valid, Kind kind) {
  if (valid.empty()) return {};
  int options = UTF8PROC_STABLE;
  if (kind == Kind::kNfc || kind == Kind::kNfkc) options |= UTF8PROC_COMPOSE;
  if (kind == Kind::kNfd || kind == Kind::kNfkd) options |= UTF8PROC_DECOMPOSE;
  if (kind == Kind::kNfkc || kind == Kind::kNfkd) options |= UTF8PROC_COMPAT;
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t length = utf8proc_map(
      reinterpret_cast<const utf8proc_uint8_t*>(valid.data()),
      static_cast<utf8proc_ssize_t>(valid.size()), &out, static_cast<utf8proc_option_t>(options));
  if (length < 0) {
    // Only out of memory can get here: the run was checked to be well-formed.
    throw std::runtime_error(std::string("Unicode normalization failed: ") +
                             utf8proc_errmsg(length));
  }
  std::string result(reinterpret_cast<const char*>(out), static_cast<size_t>(length));
  std::free(out);
  return result;
}

// Applies `form` to each well-formed run of `text`, passing ill-formed bytes through.
template <typename Form>
std::string by_valid_runs(std::string_view text, const Form& form) {
  std::string out;
  size_t run = 0;
  size_t at = 0;
  while (at < text.size()) {
    const Utf8Char c = decode_utf8(text, at);
    if (c.code_point == kInvalidCodePoint) {
      out += form(text.substr(run, at - run));
      out += text[at];
      run = at + 1;
    }
    at += c.length;
  }
  out += form(text.substr(run));
  return out;
}

std::string lowercase(std::string_view valid) {
  std::string out;
  out.reserve(valid.size());
  for (size_t at = 0; at < valid.size();) {
    const Utf8Char c = decode_utf8(valid, at);
    if (c.code_point == 0x130) {
      out += "i\xCC\x87";  // İ: the one unconditional lowercase mapping to two characters
    } else {
      append_utf8(
          static_cast<uint32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c.code_point))),
          out);
    }
    at += c.length;
  }
  return out;
}

std::string replace(const NormalizerStep& step, std::string_view text) {
  std::vector<ByteRange> matches;
  step.pattern->find_all(text, matches);
  std::string out;
  size_t previous = 0;
  for (const auto& [start, stop] : matches) {
    out.append(text.substr(previous, start - previous));
    out += step.content;
    previous = stop;
  }
  out.append(text.substr(previous));
  return out;
}

std::string apply_step(const NormalizerStep& step, std::string_view text) {
  switch (step.kind) {
    case Kind::kLowercase:
      return by_valid_runs(text, lowercase);
    case Kind::kReplace:
      return replace(step, text);
    case Kind::kPrepend:
      return text.empty() ? std::string() : step.content + std::string(text);
    default:
      return by_valid_runs(text,
                           [&step](std::string_view run) { return utf8proc_form(run, step.kind); });
  }
}

}  // namespace

std::string normalize(const std::vector<NormalizerStep>& steps, std::string_view text,
                      bool section_start) {
  std::string current(text);
  for (const NormalizerStep& step : steps) {
    if (step.kind == Kind::kPrepend && !section_start) continue;
    current = apply_step(step, current);
  }
  return current;
}

}  // namespace lomo
