// The one way lomo reads a whole file into memory (configuration, job specs, tokenizer models,
// checkpoint metadata). No gRPC or protobuf: the training library uses it too.
#pragma once

#include <cstdint>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>

namespace lomo {

// what() starts with the path: "<path>: cannot open: No such file or directory".
class FileReadError : public std::runtime_error {
 public:
  FileReadError(const std::filesystem::path& path, const std::string& reason)
      : std::runtime_error(path.string() + ": " + reason), reason_(reason) {}
  // What went wrong, without the path ("cannot open: No such file or directory"), for a caller
  // whose own error already names the file.
  const std::string& reason() const { return reason_; }

 private:
  std::string reason_;
};

// The file's bytes. Throws FileReadError when it cannot be opened, is a directory, is larger than
// `max_bytes`, or a read fails.
std::string read_file(const std::filesystem::path& path,
                      uint64_t max_bytes = std::numeric_limits<uint64_t>::max());

}  // namespace lomo
