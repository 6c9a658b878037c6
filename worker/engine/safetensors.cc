#include "worker/engine/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>
#include <utility>

#include "common/atomic_file.h"

namespace lomo {
namespace {

using nlohmann::json;

// Tensor bytes go to and from disk as they lie in memory, and the format is little-endian.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes little-endian");

// A valid header nests three levels: the root object, a tensor's object, its shape array.
constexpr int kMaxHeaderNesting = 3;
// Names in messages are cut: a hostile header may hold a name of many megabytes.
constexpr size_t kMaxNameInMessage = 200;

// Cuts `text` to about kMaxNameInMessage bytes without splitting a UTF-8 sequence, so that the
// message stays valid UTF-8 for whoever forwards it (JSON, protobuf strings).
std::string shortened(std::string_view text) {
  if (text.size() <= kMaxNameInMessage) return std::string(text);
  size_t cut = kMaxNameInMessage;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xc0u) == 0x80u) --cut;
  return std::string(text.substr(0, cut)) + "...";
}

std::string quote_name(std::string_view name) { return "'" + shortened(name) + "'"; }

[[noreturn]] void fail(const std::string& source, const std::string& problem) {
  throw CheckpointError(source + ": " + problem);
}

[[noreturn]] void fail_tensor(const std::string& source, std::string_view name,
                              const std::string& problem) {
  throw CheckpointError(source + ": tensor " + quote_name(name) + ": " + problem);
}

// A short rendering of a JSON value for messages; hostile values may be megabytes long.
std::string excerpt(const json& value) { return shortened(value.dump()); }

std::string range_string(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

uint64_t decode_u64_le(const char* bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<unsigned char>(bytes[i]);
  return value;
}

void encode_u64_le(uint64_t value, char* bytes) {
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xffu);
}

// Validates the 8-byte header length against the file before anything is allocated for it.
uint64_t header_length(std::string_view first_bytes, uint64_t file_size,
                       const std::string& source) {
  if (file_size < 8 || first_bytes.size() < 8) {
    fail(source, "file is " + std::to_string(file_size) +
                     " bytes, too short for a safetensors header (not a safetensors file?)");
  }
  const uint64_t length = decode_u64_le(first_bytes.data());
  if (length > kMaxSafetensorsHeaderBytes) {
    fail(source, "header length " + std::to_string(length) + " exceeds the limit of " +
                     std::to_string(kMaxSafetensorsHeaderBytes) +
                     " bytes (not a safetensors file?)");
  }
  if (length > file_size - 8) {
    fail(source, "header length " + std::to_string(length) + " exceeds the file size " +
                     std::to_string(file_size) + " (file truncated?)");
  }
  return length;
}

json parse_header_json(std::string_view text, const std::string& source) {
  struct Rejected {
    std::string problem;
  };
  std::set<std::string> names;
  const json::parser_callback_t check = [&names](int depth, json::parse_event_t event,
                                                 json& parsed) {
    const bool opens =
        event == json::parse_event_t::object_start || event == json::parse_event_t::array_start;
    if (opens && depth >= kMaxHeaderNesting) {
      throw Rejected{"header nests deeper than a tensor's shape"};
    }
    // The JSON parser would keep the last of two equal keys; a second tensor of the same name
    // is ambiguous, so refuse it.
    if (event == json::parse_event_t::key && depth == 1 &&
        !names.insert(parsed.get<std::string>()).second) {
      throw Rejected{"tensor " + quote_name(parsed.get<std::string>()) + " appears twice"};
    }
    return true;
  };
  try {
    return json::parse(text, check);
  } catch (const json::exception& error) {  // parse_error, or out_of_range for 1e400
    fail(source, std::string("header is not valid JSON: ") + error.what());
  } catch (const Rejected& rejected) {
    fail(source, "invalid header: " + rejected.problem);
  }
}

void parse_metadata(const json& value, const std::string& source,
                    std::map<std::string, std::string>& metadata) {
  if (!value.is_object()) fail(source, "__metadata__: expected an object of strings");
  for (const auto& [key, text] : value.items()) {
    if (!text.is_string())
      fail(source, "__metadata__: value of " + quote_name(key) + " is not a string");
    metadata.emplace(key, text.get<std::string>());
  }
}

std::vector<int64_t> parse_shape(const json& entry, const std::string& name,
                                 const std::string& source) {
  const auto it = entry.find("shape");
  if (it == entry.end() || !it->is_array()) fail_tensor(source, name, "'shape' must be a list");
  std::vector<int64_t> shape;
  shape.reserve(it->size());
  for (const json& extent : *it) {
    const bool valid =
        extent.is_number_unsigned() && extent.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX);
    if (!valid) {
      fail_tensor(source, name,
                  "shape entries must be non-negative integers, got " + excerpt(extent));
    }
    shape.push_back(static_cast<int64_t>(extent.get<uint64_t>()));
  }
  return shape;
}

std::pair<uint64_t, uint64_t> parse_offsets(const json& entry, const std::string& name,
                                            const std::string& source) {
  const auto it = entry.find("data_offsets");
  const bool valid = it != entry.end() && it->is_array() && it->size() == 2 &&
                     (*it)[0].is_number_unsigned() && (*it)[1].is_number_unsigned();
  if (!valid) {
    fail_tensor(source, name, "'data_offsets' must be [begin, end] with non-negative integers");
  }
  return {(*it)[0].get<uint64_t>(), (*it)[1].get<uint64_t>()};
}

DType parse_entry_dtype(const json& entry, const std::string& name, const std::string& source) {
  const auto it = entry.find("dtype");
  if (it == entry.end() || !it->is_string()) fail_tensor(source, name, "'dtype' must be a string");
  DType dtype;
  if (!parse_dtype(it->get<std::string>(), &dtype)) {
    fail_tensor(source, name,
                "dtype " + quote_name(it->get<std::string>()) +
                    " is not supported (lomo reads F32, F16 and BF16)");
  }
  return dtype;
}

SafetensorsTensorInfo parse_tensor_entry(const std::string& name, const json& entry,
                                         uint64_t buffer_size, const std::string& source) {
  if (!entry.is_object()) {
    fail_tensor(source, name, "expected an object with dtype, shape and data_offsets");
  }
  SafetensorsTensorInfo info;
  info.name = name;
  info.dtype = parse_entry_dtype(entry, name, source);
  info.shape = parse_shape(entry, name, source);
  std::tie(info.begin, info.end) = parse_offsets(entry, name, source);
  const std::string offsets = range_string(info.begin, info.end);
  if (info.end < info.begin)
    fail_tensor(source, name, "data_offsets " + offsets + " end before they begin");
  if (info.end > buffer_size) {
    fail_tensor(source, name,
                "data_offsets " + offsets + " extend past the data buffer of " +
                    std::to_string(buffer_size) + " bytes (file truncated?)");
  }
  uint64_t bytes = dtype_size(info.dtype);
  for (const int64_t extent : info.shape) {
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(extent), &bytes)) {
      fail_tensor(source, name, "shape " + shape_to_string(info.shape) + " overflows 64 bits");
    }
  }
  if (bytes != info.size_bytes()) {
    fail_tensor(source, name,
                "shape " + shape_to_string(info.shape) + " of " +
                    std::string(dtype_name(info.dtype)) + " needs " + std::to_string(bytes) +
                    " bytes but data_offsets " + offsets + " hold " +
                    std::to_string(info.size_bytes()));
  }
  return info;
}

// The format requires the tensors to cover the data buffer exactly: an overlap would alias two
// tensors, and a gap or tail could smuggle other content into a file that passes as weights.
void check_tiling(std::vector<SafetensorsTensorInfo>& tensors, uint64_t buffer_size,
                  const std::string& source) {
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t cursor = 0;
  const SafetensorsTensorInfo* previous = nullptr;
  for (const SafetensorsTensorInfo& tensor : tensors) {
    if (tensor.begin < cursor) {
      fail_tensor(source, tensor.name,
                  "data_offsets " + range_string(tensor.begin, tensor.end) + " overlap tensor " +
                      quote_name(previous->name) + " " +
                      range_string(previous->begin, previous->end));
    }
    if (tensor.begin > cursor) {
      fail_tensor(source, tensor.name,
                  "data_offsets " + range_string(tensor.begin, tensor.end) + " leave bytes [" +
                      std::to_string(cursor) + ", " + std::to_string(tensor.begin) +
                      ") of the data buffer unused");
    }
    cursor = tensor.end;
    previous = &tensor;
  }
  if (cursor != buffer_size) {
    fail(source,
         std::to_string(buffer_size - cursor) + " bytes after the last tensor belong to no tensor");
  }
}

[[noreturn]] void fail_errno(const std::filesystem::path& path, const std::string& operation) {
  throw CheckpointError(path.string() + ": " + operation + ": " +
                        std::generic_category().message(errno));
}

void pread_exact(int fd, void* destination, uint64_t count, uint64_t offset,
                 const std::filesystem::path& path) {
  char* cursor = static_cast<char*>(destination);
  while (count > 0) {
    const size_t request = static_cast<size_t>(std::min<uint64_t>(count, uint64_t{1} << 30));
    const ssize_t got = ::pread(fd, cursor, request, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      fail_errno(path, "read at offset " + std::to_string(offset));
    }
    if (got == 0) {
      throw CheckpointError(path.string() + ": unexpected end of file at offset " +
                            std::to_string(offset) + " (file truncated while open?)");
    }
    cursor += got;
    offset += static_cast<uint64_t>(got);
    count -= static_cast<uint64_t>(got);
  }
}

json header_entry(const SafetensorsTensorView& tensor, uint64_t begin, uint64_t end) {
  return {
      {"dtype", dtype_name(tensor.dtype)}, {"shape", tensor.shape}, {"data_offsets", {begin, end}}};
}

uint64_t view_size_bytes(const SafetensorsTensorView& tensor, const std::string& path) {
  uint64_t bytes = dtype_size(tensor.dtype);
  for (const int64_t extent : tensor.shape) {
    if (extent < 0 || __builtin_mul_overflow(bytes, static_cast<uint64_t>(extent), &bytes)) {
      throw std::invalid_argument(path + ": tensor " + quote_name(tensor.name) +
                                  " has invalid shape " + shape_to_string(tensor.shape));
    }
  }
  return bytes;
}

// The JSON header of `tensors` laid out back to back, padded to end the preamble on 8 bytes.
std::string build_header(const std::vector<SafetensorsTensorView>& tensors,
                         const std::map<std::string, std::string>& metadata,
                         const std::string& path) {
  json header = json::object();
  uint64_t offset = 0;
  for (const SafetensorsTensorView& tensor : tensors) {
    if (tensor.name.empty() || tensor.name == "__metadata__") {
      throw std::invalid_argument(path + ": invalid tensor name " + quote_name(tensor.name));
    }
    if (header.contains(tensor.name)) {
      throw std::invalid_argument(path + ": tensor " + quote_name(tensor.name) + " given twice");
    }
    const uint64_t bytes = view_size_bytes(tensor, path);
    if (bytes > 0 && tensor.data == nullptr) {
      throw std::invalid_argument(path + ": tensor " + quote_name(tensor.name) + " has no data");
    }
    header[tensor.name] = header_entry(tensor, offset, offset + bytes);
    offset += bytes;
  }
  json metadata_json(metadata);
  if (!metadata_json.contains("format")) metadata_json["format"] = "pt";
  header["__metadata__"] = std::move(metadata_json);
  std::string text;
  try {
    text = header.dump();
  } catch (const json::type_error& error) {
    throw std::invalid_argument(path +
                                ": tensor names and metadata must be UTF-8: " + error.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // 8-byte length + text stays 8-aligned
  return text;
}

}  // namespace

std::string SafetensorsTensorInfo::shape_string() const { return shape_to_string(shape); }

const SafetensorsTensorInfo* SafetensorsHeader::find(std::string_view name) const {
  for (const SafetensorsTensorInfo& tensor : tensors) {
    if (tensor.name == name) return &tensor;
  }
  return nullptr;
}

SafetensorsHeader parse_safetensors_header(std::string_view file_prefix, uint64_t file_size,
                                           const std::string& source) {
  const uint64_t length = header_length(file_prefix, file_size, source);
  if (file_prefix.size() - 8 < length) {
    fail(source, "only " + std::to_string(file_prefix.size() - 8) + " of the " +
                     std::to_string(length) + " header bytes are present");
  }
  const json root = parse_header_json(file_prefix.substr(8, length), source);
  if (!root.is_object()) fail(source, "header must be a JSON object");
  SafetensorsHeader header;
  header.data_offset = 8 + length;
  const uint64_t buffer_size = file_size - header.data_offset;
  header.tensors.reserve(root.size());
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      parse_metadata(entry, source, header.metadata);
    } else {
      header.tensors.push_back(parse_tensor_entry(name, entry, buffer_size, source));
    }
  }
  check_tiling(header.tensors, buffer_size, source);
  return header;
}

SafetensorsFile::SafetensorsFile(std::filesystem::path path, int fd, SafetensorsHeader header)
    : path_(std::move(path)), fd_(fd), header_(std::move(header)) {}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      header_(std::move(other.header_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
    header_ = std::move(other.header_);
  }
  return *this;
}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_errno(path, "cannot open");
  SafetensorsFile file(path, fd, {});  // owns fd from here, also when a check below throws
  struct stat status;
  if (::fstat(fd, &status) != 0) fail_errno(path, "stat");
  if (!S_ISREG(status.st_mode)) throw CheckpointError(path.string() + ": not a regular file");
  const auto file_size = static_cast<uint64_t>(status.st_size);

  std::string prefix(std::min<uint64_t>(file_size, 8), '\0');
  pread_exact(fd, prefix.data(), prefix.size(), 0, path);
  const uint64_t length = header_length(prefix, file_size, path.string());
  prefix.resize(8 + length);
  pread_exact(fd, prefix.data() + 8, length, 8, path);
  file.header_ = parse_safetensors_header(prefix, file_size, path.string());
  return file;
}

const SafetensorsTensorInfo& SafetensorsFile::tensor(std::string_view name) const {
  const SafetensorsTensorInfo* info = find(name);
  if (info == nullptr) fail(path_.string(), "no tensor " + quote_name(name));
  return *info;
}

void SafetensorsFile::read_tensor(std::string_view name, void* destination) const {
  const SafetensorsTensorInfo& info = tensor(name);
  read_tensor_range(info, 0, info.size_bytes(), destination);
}

void SafetensorsFile::read_tensor_range(const SafetensorsTensorInfo& tensor, uint64_t byte_offset,
                                        uint64_t byte_count, void* destination) const {
  if (byte_offset > tensor.size_bytes() || byte_count > tensor.size_bytes() - byte_offset) {
    throw std::invalid_argument(path_.string() + ": tensor " + quote_name(tensor.name) +
                                ": bytes [" + std::to_string(byte_offset) + ", +" +
                                std::to_string(byte_count) + ") lie outside its " +
                                std::to_string(tensor.size_bytes()) + " bytes");
  }
  pread_exact(fd_, destination, byte_count, header_.data_offset + tensor.begin + byte_offset,
              path_);
}

void write_safetensors(const std::filesystem::path& path,
                       const std::vector<SafetensorsTensorView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string header = build_header(tensors, metadata, path.string());
  char length[8];
  encode_u64_le(header.size(), length);
  AtomicFileWriter writer(path);
  writer.write(length, sizeof(length));
  writer.write(header);
  for (const SafetensorsTensorView& tensor : tensors) {
    writer.write(tensor.data, view_size_bytes(tensor, path.string()));
  }
  writer.commit();
}

}  // namespace lomo
