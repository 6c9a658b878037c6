// The JSON form of lomo.v1 messages, the one both the REST gateway (server/rest.cc) and
// `lomoctl --output json` print, so that a script can switch between them: protobuf's canonical
// JSON mapping (lowerCamelCase names, enums by name, int64 as strings, Timestamps in RFC 3339),
// with every field present even when it holds its default, as dashboards expect.
#pragma once

#include <google/protobuf/message.h>

#include <string>

namespace lomo {

// Throws std::runtime_error when the message cannot be encoded (a string that is not UTF-8).
// `pretty`: indented over several lines (the same JSON value either way).
std::string api_json(const google::protobuf::Message& message, bool pretty = false);

}  // namespace lomo
