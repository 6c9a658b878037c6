#include "common/advertise_address.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <stdexcept>

namespace lomo {
namespace {

struct HostPort {
  std::string host;
  std::string port;
};

HostPort split_host_port(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) {
    throw std::runtime_error("coordinator address '" + address + "' is not HOST:PORT");
  }
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return {host, address.substr(colon + 1)};
}

using AddrInfoList = std::unique_ptr<addrinfo, decltype(&freeaddrinfo)>;

// The coordinator's addresses of `family` (AF_UNSPEC: any); an empty list when there is none.
AddrInfoList resolve(const HostPort& target, int family, std::string* problem) {
  addrinfo hints{};
  hints.ai_family = family;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  const int error = ::getaddrinfo(target.host.c_str(), target.port.c_str(), &hints, &found);
  if (error != 0) *problem = ::gai_strerror(error);
  return AddrInfoList(error == 0 ? found : nullptr, freeaddrinfo);
}

// The local address of the route to `to`, or "" with `*problem` set.
std::string local_address_of_route(const addrinfo& to, std::string* problem) {
  const int fd = ::socket(to.ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    *problem = std::strerror(errno);
    return "";
  }
  sockaddr_storage local{};
  socklen_t length = sizeof(local);
  std::string text;
  // A UDP connect only picks the route and the source address: nothing goes on the wire.
  if (::connect(fd, to.ai_addr, to.ai_addrlen) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) != 0) {
    *problem = std::strerror(errno);
  } else {
    char buffer[INET6_ADDRSTRLEN] = {};
    const void* address =
        local.ss_family == AF_INET
            ? static_cast<const void*>(&reinterpret_cast<sockaddr_in&>(local).sin_addr)
            : static_cast<const void*>(&reinterpret_cast<sockaddr_in6&>(local).sin6_addr);
    if (::inet_ntop(local.ss_family, address, buffer, sizeof(buffer)) != nullptr) text = buffer;
  }
  ::close(fd);
  return text;
}

}  // namespace

std::string local_address_toward(const std::string& coordinator) {
  const HostPort target = split_host_port(coordinator);
  std::string problem;
  // IPv4 first: "localhost" then means 127.0.0.1, which every Gloo build can bind.
  for (const int family : {AF_INET, AF_UNSPEC}) {
    const AddrInfoList addresses = resolve(target, family, &problem);
    for (const addrinfo* a = addresses.get(); a != nullptr; a = a->ai_next) {
      std::string local = local_address_of_route(*a, &problem);
      if (!local.empty()) return local;
    }
  }
  throw std::runtime_error("cannot find this host's address toward the coordinator " + coordinator +
                           ": " + problem);
}

}  // namespace lomo
