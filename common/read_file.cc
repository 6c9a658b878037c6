#include "common/read_file.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <system_error>

namespace lomo {

std::string read_file(const std::filesystem::path& path, uint64_t max_bytes) {
  std::error_code error;
  // An ifstream opens a directory without complaint and then reads nothing.
  if (std::filesystem::is_directory(path, error)) {
    throw FileReadError(path, "cannot open: it is a directory");
  }
  std::ifstream file(path, std::ios::binary);
  if (!file) throw FileReadError(path, std::string("cannot open: ") + std::strerror(errno));
  const uint64_t size = std::filesystem::file_size(path, error);
  if (!error && size > max_bytes) {
    throw FileReadError(path, std::to_string(size) + " bytes is too large (at most " +
                                  std::to_string(max_bytes) + ")");
  }
  std::ostringstream bytes;
  bytes << file.rdbuf();
  if (file.bad()) throw FileReadError(path, std::string("read failed: ") + std::strerror(errno));
  return std::move(bytes).str();
}

}  // namespace lomo
