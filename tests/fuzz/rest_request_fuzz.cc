// Fuzzes the coordinator's REST request path end to end (issue 12): each input is written as raw
// bytes to a new loopback connection of the real RestServer (cpp-httplib's parser, lomo's Host and
// Content-Type guards, authentication, routing, the JSON bodies and query parameters, the
// handlers) over a real Coordinator and store, and what comes back is read. Findings: a
// crash or sanitizer report; a response that does not start with a well-formed HTTP status line;
// a 500 (untrusted input must get a 4xx, never an internal error); /healthz not answering 200
// afterwards. An input may get no response at all (no complete request line).
//
// Returns 0 for a 2xx answer and -1 otherwise, so seeds named valid_* must be served and
// invalid_* refused. Seeds use the fixture's admin token (coordinator_fuzz_fixture.h).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <regex>
#include <stdexcept>
#include <string>
#include <string_view>

#include "server/rest.h"
#include "tests/fuzz/coordinator_fuzz_fixture.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Server {
  Server()
      : rest(*lomo::fuzz::coordinator_fixture().coordinator,
             lomo::fuzz::coordinator_fixture().metrics, 4, lomo::fuzz::coordinator_fixture().auth) {
    port = rest.bind("127.0.0.1", 0);
    rest.start();
  }
  lomo::server::RestServer rest;
  int port = 0;
};

Server& server() {
  static Server* made = new Server();  // never destroyed: see coordinator_fuzz_fixture.h
  return *made;
}

int connect_to(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    ::close(fd);
    throw std::runtime_error(std::string("cannot connect to the REST server: ") +
                             std::strerror(errno));
  }
  return fd;
}

// Sends `request` and reads what comes back until the server closes, `first` passes without a
// byte (the server waits for the rest of an incomplete request), or `quiet` passes after the last
// byte (a kept-alive connection, a followed event stream). Not half-closed: cpp-httplib drops a
// connection whose peer shut down its side before it answered.
std::string exchange(int port, std::string_view request, std::chrono::milliseconds first,
                     std::chrono::milliseconds quiet) {
  const int fd = connect_to(port);
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server may close early (413, a parse error): answer read below
    sent += static_cast<size_t>(n);
  }
  std::string response;
  char buffer[8192];
  for (;;) {
    pollfd readable{fd, POLLIN, 0};
    const auto wait = response.empty() ? first : quiet;
    if (::poll(&readable, 1, static_cast<int>(wait.count())) <= 0) break;
    const ssize_t n = ::recv(fd, buffer, sizeof(buffer), 0);
    if (n <= 0) break;
    response.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return response;
}

// The status code of a response that starts "HTTP/1.x NNN ", or -1.
int status_of(const std::string& response) {
  static const std::regex status_line("^HTTP/1\\.[01] ([1-5][0-9][0-9]) [^\\r\\n]*\\r\\n");
  std::smatch match;
  if (!std::regex_search(
          response.cbegin(),
          response.cbegin() + static_cast<std::ptrdiff_t>(std::min<size_t>(response.size(), 256)),
          match, status_line)) {
    return -1;
  }
  return std::stoi(match[1].str());
}

// With $LOMO_FUZZ_LAST_INPUT set, each input is written there before it is sent: a crash in a
// server thread ends the process before the driver can print the input, and this keeps it.
void keep_input(const uint8_t* data, size_t size) {
  static const char* path = std::getenv("LOMO_FUZZ_LAST_INPUT");
  if (path == nullptr) return;
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  keep_input(data, size);
  const int port = server().port;
  const std::string response =
      exchange(port, std::string_view(reinterpret_cast<const char*>(data), size),
               std::chrono::milliseconds(500), std::chrono::milliseconds(100));
  if (!response.empty() && status_of(response) < 0) {
    throw std::runtime_error("not an HTTP status line: " + response.substr(0, 80));
  }
  const int status = response.empty() ? 0 : status_of(response);
  if (status == 500)
    throw std::runtime_error("500 for untrusted input: " + response.substr(0, 300));
  const std::string health =
      exchange(port, "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
               std::chrono::milliseconds(5000), std::chrono::milliseconds(5000));
  if (status_of(health) != 200) {
    throw std::runtime_error("/healthz does not answer 200 afterwards: " + health.substr(0, 200));
  }
  return status >= 200 && status < 300 ? 0 : -1;
}
