// Writing a whole buffer to a file descriptor. Header-only on purpose: the libraries that use it
// (lomo_transfer with protobuf, lomo_trainer_protocol and lomo_layout without) share no other
// library, and this keeps each of them free of a new link dependency.
#pragma once

#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <string_view>

namespace lomo {

// Writes all of `data` to `fd`, finishing short writes and retrying after EINTR. false on an
// error (errno says which), after an unknown prefix of `data` was written; a write that makes no
// progress (returns 0) counts as an error rather than looping forever.
inline bool write_all(int fd, std::string_view data) {
  size_t written = 0;
  while (written < data.size()) {
    const ssize_t n = ::write(fd, data.data() + written, data.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    written += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace lomo
