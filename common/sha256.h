// SHA-256, hex-encoded in lower case: the checksum carried with every checkpoint file uploaded to
// or downloaded from the coordinator (DESIGN.md, "Checkpoints").
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

namespace lomo {

// Incremental hashing: update() any number of times, then hex_digest() once.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  Sha256(Sha256&&) noexcept;
  Sha256& operator=(Sha256&&) noexcept;

  void update(const void* data, size_t size);
  void update(std::string_view data) { update(data.data(), data.size()); }
  // 64 lower-case hex digits. The object cannot be updated afterwards.
  std::string hex_digest();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

std::string sha256_hex(std::string_view data);
// True for exactly 64 hex digits (either case): the form a SHA-256 arrives in over the wire.
bool is_sha256_hex(std::string_view text);
// Reads the whole file; throws std::runtime_error naming the file if it cannot be read.
std::string sha256_file_hex(const std::filesystem::path& file);

}  // namespace lomo
