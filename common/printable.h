// Untrusted text quoted back in an error message (a spec value, a dataset record, a protocol
// line): a fuzzer or a pasted binary can make it arbitrarily long or unprintable, so it is cut and
// escaped before it reaches a terminal or a log.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace lomo {

// At most `max_bytes` bytes of `text`, never cut inside a UTF-8 sequence, with "..." when cut;
// control characters (and DEL) become \xNN.
std::string printable_excerpt(std::string_view text, size_t max_bytes);

}  // namespace lomo
