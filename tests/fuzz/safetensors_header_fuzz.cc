// Fuzzes the safetensors reader with whole files: the input is a file's bytes, length prefix first.
// parse_safetensors_header may reject input only with CheckpointError; anything else (a crash, a
// sanitizer report, another exception, a broken promise of the accepted header) is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "worker/engine/safetensors.h"

namespace {

void require(bool condition) {
  if (!condition) __builtin_trap();
}

// What parse_safetensors_header promises about a header it accepts.
void check_accepted_header(const lomo::SafetensorsHeader& header, uint64_t file_size) {
  require(header.data_offset >= 8 && header.data_offset <= file_size);
  uint64_t cursor = 0;
  for (const lomo::SafetensorsTensorInfo& tensor : header.tensors) {
    require(tensor.begin == cursor && tensor.end >= tensor.begin);
    uint64_t bytes = lomo::dtype_size(tensor.dtype);
    for (const int64_t extent : tensor.shape) {
      require(extent >= 0);
      bytes *= static_cast<uint64_t>(extent);  // cannot overflow: the parser checked
    }
    require(bytes == tensor.size_bytes());
    require(header.find(tensor.name) == &tensor);
    cursor = tensor.end;
  }
  require(cursor == file_size - header.data_offset);
}

// The file reader must agree with the parser and return exactly the bytes in the buffer. The input
// goes to an in-memory file so that no disk is touched.
void check_file_reader(std::string_view bytes, const lomo::SafetensorsHeader& header) {
  const int fd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
  if (fd < 0) return;
  require(write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  {
    const lomo::SafetensorsFile file =
        lomo::SafetensorsFile::open("/proc/self/fd/" + std::to_string(fd));
    require(file.tensors().size() == header.tensors.size());
    for (const lomo::SafetensorsTensorInfo& tensor : file.tensors()) {
      std::vector<char> data(tensor.size_bytes());
      file.read_tensor(tensor.name, data.data());
      require(data.empty() ||
              std::memcmp(data.data(), bytes.data() + header.data_offset + tensor.begin,
                          data.size()) == 0);
    }
  }
  close(fd);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  lomo::SafetensorsHeader header;
  try {
    header = lomo::parse_safetensors_header(bytes, size, "fuzz.safetensors");
  } catch (const lomo::CheckpointError&) {
    return -1;  // the documented rejection of a malformed file
  }
  // From here on any exception escapes: the reader must accept what the parser accepted.
  check_accepted_header(header, size);
  check_file_reader(bytes, header);
  return 0;
}
