#include "common/rendezvous_relay.h"

#include <charconv>
#include <stdexcept>

namespace lomo::rendezvous_relay {
namespace {

constexpr char kHexDigits[] = "0123456789abcdef";

std::string hex(std::string_view bytes) {
  std::string text;
  text.reserve(bytes.size() * 2);
  for (const char c : bytes) {
    const auto byte = static_cast<unsigned char>(c);
    text.push_back(kHexDigits[byte >> 4]);
    text.push_back(kHexDigits[byte & 15]);
  }
  return text;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  throw std::invalid_argument(std::string("rendezvous relay: not a hex digit: '") + c + "'");
}

std::string unhex(std::string_view text) {
  if (text.size() % 2 != 0) throw std::invalid_argument("rendezvous relay: odd-length hex field");
  std::string bytes;
  bytes.reserve(text.size() / 2);
  for (size_t i = 0; i < text.size(); i += 2) {
    bytes.push_back(static_cast<char>(hex_digit(text[i]) * 16 + hex_digit(text[i + 1])));
  }
  return bytes;
}

// The space-separated words of a line; an empty field is written as "-" (hex of nothing).
std::vector<std::string_view> words(std::string_view line) {
  std::vector<std::string_view> result;
  while (!line.empty()) {
    const size_t end = line.find(' ');
    result.push_back(line.substr(0, end));
    if (end == std::string_view::npos) break;
    line.remove_prefix(end + 1);
  }
  return result;
}

std::string field(std::string_view bytes) { return bytes.empty() ? "-" : hex(bytes); }
std::string unfield(std::string_view word) { return word == "-" ? "" : unhex(word); }

}  // namespace

std::string format_request(const Request& request) {
  if (const auto* set = std::get_if<SetRequest>(&request)) {
    return "set " + field(set->key) + " " + field(set->value);
  }
  const auto& get = std::get<GetRequest>(request);
  std::string line = "get " + std::to_string(get.timeout.count());
  for (const std::string& key : get.keys) line += " " + field(key);
  return line;
}

Request parse_request(std::string_view line) {
  const std::vector<std::string_view> w = words(line);
  if (w.size() == 3 && w[0] == "set") return SetRequest{unfield(w[1]), unfield(w[2])};
  if (w.size() >= 3 && w[0] == "get") {
    int64_t milliseconds = 0;
    const auto [end, error] = std::from_chars(w[1].data(), w[1].data() + w[1].size(), milliseconds);
    if (error != std::errc() || end != w[1].data() + w[1].size() || milliseconds < 0) {
      throw std::invalid_argument("rendezvous relay: bad timeout in a get request");
    }
    GetRequest get;
    get.timeout = std::chrono::milliseconds(milliseconds);
    for (size_t i = 2; i < w.size(); ++i) get.keys.push_back(unfield(w[i]));
    return get;
  }
  throw std::invalid_argument("rendezvous relay: not a request: \"" +
                              std::string(line.substr(0, 40)) + "\"");
}

std::string format_reply(const Reply& reply) {
  if (!reply.ok) return "error " + field(reply.error);
  std::string line = "ok";
  for (const std::string& value : reply.values) line += " " + field(value);
  return line;
}

Reply parse_reply(std::string_view line) {
  const std::vector<std::string_view> w = words(line);
  if (w.size() == 2 && w[0] == "error") return Reply{false, {}, unfield(w[1])};
  if (!w.empty() && w[0] == "ok") {
    Reply reply;
    for (size_t i = 1; i < w.size(); ++i) reply.values.push_back(unfield(w[i]));
    return reply;
  }
  throw std::invalid_argument("rendezvous relay: not a reply: \"" +
                              std::string(line.substr(0, 40)) + "\"");
}

}  // namespace lomo::rendezvous_relay
