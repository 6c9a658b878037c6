// Untrusted text quoted back in an error message (a spec value, a dataset record, a protocol
// line): a fuzzer or a pasted binary can make it arbitrarily long or unprintable, so it is cut and
// escaped before it reaches a terminal or a log.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace lomo {

// At most `max_bytes` bytes of `text`, never cut inside a UTF-8 sequence, with "..." when cut;
// control characters (and DEL) and bytes that are not UTF-8 become \xNN, C1 controls \u0080..
// \u009f: nothing in the result can move the cursor, clear the screen or start a new row.
std::string printable_excerpt(std::string_view text, size_t max_bytes);

// All of `text` escaped as printable_excerpt() does, except that tabs stay (a log line's columns).
std::string terminal_line(std::string_view text);

// `text` with every byte that is not part of well-formed UTF-8 replaced by U+FFFD: what may go
// into a protobuf string field (gRPC drops a message whose string is not UTF-8, and the stream
// with it).
std::string valid_utf8(std::string_view text);

}  // namespace lomo
