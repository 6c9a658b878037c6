// The address a gang rank advertises to its peers for the data path when none is given: the
// local address of this host's route to the coordinator (a UDP socket connected to the
// coordinator's resolved address, read back with getsockname; no packet is sent). Every worker
// reaches the coordinator, so the interface it uses to do so is the likeliest to be reachable
// by the other workers; a coordinator on loopback gives 127.0.0.1 (a single-host gang).
#pragma once

#include <string>

namespace lomo {

// `coordinator`: "HOST:PORT" or "[IPv6]:PORT". Resolves the host (IPv4 first), and returns the
// numeric local address ("10.0.3.7", "127.0.0.1", "fd00::7"). Throws std::runtime_error naming the
// coordinator when it cannot be resolved or no route leads to it.
std::string local_address_toward(const std::string& coordinator);

}  // namespace lomo
