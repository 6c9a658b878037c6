// The line protocol between a gang rank's trainer and its rendezvous relay.
//
// The trainer (lomo-worker train) cannot speak gRPC: it links libsentencepiece, whose bundled
// protobuf-lite crashes beside gRPC's libprotobuf (daemon/README.md). So a rank that meets its
// peers through the coordinator starts `lomo-workerd rendezvous-relay` as a child and sends it one
// request per line on its stdin; the relay makes the WorkerService Rendezvous calls and answers
// one line per request on its stdout, in order. Keys and values are hex-encoded, so any bytes
// travel and a line is always one request.
//
//   set <key> <value>             ->  ok
//   get <timeout ms> <key>...     ->  ok <value>...   (every key's value, in order)
//   any request                   ->  error <message>  (the message hex-encoded too)
#pragma once

#include <chrono>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace lomo::rendezvous_relay {

struct SetRequest {
  std::string key;
  std::string value;
  bool operator==(const SetRequest&) const = default;
};

// Waits until every key is set (or `timeout` passes, which is an error reply).
struct GetRequest {
  std::vector<std::string> keys;
  std::chrono::milliseconds timeout{0};
  bool operator==(const GetRequest&) const = default;
};

using Request = std::variant<SetRequest, GetRequest>;

struct Reply {
  bool ok = true;
  std::vector<std::string> values;  // a get's values, one per key
  std::string error;                // when !ok: what failed, in words
  bool operator==(const Reply&) const = default;
};

// One line each, without its '\n'. The parsers throw std::invalid_argument for a line that is not
// a request (or reply) of this protocol.
std::string format_request(const Request& request);
Request parse_request(std::string_view line);
std::string format_reply(const Reply& reply);
Reply parse_reply(std::string_view line);

}  // namespace lomo::rendezvous_relay
