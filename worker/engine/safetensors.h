// The safetensors file format (https://github.com/huggingface/safetensors): an 8-byte little-endian
// header length N, N bytes of JSON describing every tensor, then the tensors' bytes.
// Files are untrusted input: the reader validates the whole header before any tensor is read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/dtype.h"

namespace lomo {

// A checkpoint file that cannot be read as what it claims to be. The message names the file and,
// where one is involved, the tensor.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The safetensors reference implementation's limit; real headers are well under 1 MB.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

struct SafetensorsTensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  // Byte range [begin, end) relative to the start of the data buffer (not of the file).
  uint64_t begin = 0;
  uint64_t end = 0;

  uint64_t size_bytes() const { return end - begin; }
  uint64_t numel() const { return size_bytes() / dtype_size(dtype); }
  std::string shape_string() const;  // "[4096, 4096]"
};

struct SafetensorsHeader {
  uint64_t data_offset = 0;                     // where the data buffer starts in the file: 8 + N
  std::vector<SafetensorsTensorInfo> tensors;   // in data-buffer order
  std::map<std::string, std::string> metadata;  // "__metadata__"

  // nullptr when absent.
  const SafetensorsTensorInfo* find(std::string_view name) const;
};

// Parses and validates the header of a safetensors file of `file_size` bytes, given the file's
// first bytes (at least 8 + N of them; more are ignored). `source` names the file in errors.
// Guarantees on success: every dtype is F32, F16 or BF16; every shape is non-negative and its
// byte size equals its data_offsets range; the ranges tile the data buffer exactly, without
// overlap, gap or trailing bytes (as the format requires); names are unique.
// Throws CheckpointError otherwise.
SafetensorsHeader parse_safetensors_header(std::string_view file_prefix, uint64_t file_size,
                                           const std::string& source);

// An open safetensors file: its validated directory of tensors, and reads of their bytes with
// pread (nothing is held in memory but the header). Reads are safe from several threads at once.
class SafetensorsFile {
 public:
  // Throws CheckpointError naming `path` when it cannot be opened or is not a valid file.
  static SafetensorsFile open(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<SafetensorsTensorInfo>& tensors() const { return header_.tensors; }
  const SafetensorsTensorInfo* find(std::string_view name) const { return header_.find(name); }
  // Throws CheckpointError naming the tensor and the file when it is absent.
  const SafetensorsTensorInfo& tensor(std::string_view name) const;

  // Reads all of a tensor's bytes, as stored, into `destination` (size_bytes() bytes).
  void read_tensor(std::string_view name, void* destination) const;
  // Reads `byte_count` bytes starting `byte_offset` bytes into `tensor`, for chunked conversion.
  void read_tensor_range(const SafetensorsTensorInfo& tensor, uint64_t byte_offset,
                         uint64_t byte_count, void* destination) const;

 private:
  SafetensorsFile(std::filesystem::path path, int fd, SafetensorsHeader header);

  std::filesystem::path path_;
  int fd_ = -1;
  SafetensorsHeader header_;
};

// One tensor to write; `data` holds numel * dtype_size bytes in the tensor's dtype and is only
// read during the call.
struct SafetensorsTensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

// Writes `tensors` in the given order with `metadata` plus {"format": "pt"} (transformers refuses
// files without it). The header is space-padded so that the data buffer starts at a multiple of 8
// bytes, as the reference writer does. The file is written under a temporary name and renamed:
// `path` never holds a partial file. Throws std::invalid_argument for duplicate or reserved names
// or negative shapes, std::system_error for I/O failures.
void write_safetensors(const std::filesystem::path& path,
                       const std::vector<SafetensorsTensorView>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace lomo
