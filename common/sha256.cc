#include "common/sha256.h"

#include <openssl/evp.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <vector>

namespace lomo {

// OpenSSL rather than our own: it uses the SHA extensions where the CPU has them, which matters
// for multi-gigabyte checkpoints.
struct Sha256::State {
  EVP_MD_CTX* context = nullptr;
  bool finished = false;
  ~State() { EVP_MD_CTX_free(context); }
};

Sha256::Sha256() : state_(std::make_unique<State>()) {
  state_->context = EVP_MD_CTX_new();
  if (state_->context == nullptr ||
      EVP_DigestInit_ex(state_->context, EVP_sha256(), nullptr) != 1) {
    throw std::runtime_error("sha256: cannot initialise OpenSSL's digest");
  }
}

Sha256::~Sha256() = default;
Sha256::Sha256(Sha256&&) noexcept = default;
Sha256& Sha256::operator=(Sha256&&) noexcept = default;

bool is_sha256_hex(std::string_view text) {
  if (text.size() != 64) return false;
  for (char c : text) {
    if (!std::isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

void Sha256::update(const void* data, size_t size) {
  if (state_->finished) throw std::logic_error("sha256: update() after hex_digest()");
  if (size > 0 && EVP_DigestUpdate(state_->context, data, size) != 1) {
    throw std::runtime_error("sha256: digest update failed");
  }
}

std::string Sha256::hex_digest() {
  if (state_->finished) throw std::logic_error("sha256: hex_digest() called twice");
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_DigestFinal_ex(state_->context, digest, &length) != 1) {
    throw std::runtime_error("sha256: digest finalisation failed");
  }
  state_->finished = true;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex(2 * length, '0');
  for (unsigned int i = 0; i < length; ++i) {
    hex[2 * i] = kHex[digest[i] >> 4];
    hex[2 * i + 1] = kHex[digest[i] & 0xf];
  }
  return hex;
}

std::string sha256_hex(std::string_view data) {
  Sha256 hash;
  hash.update(data);
  return hash.hex_digest();
}

std::string sha256_file_hex(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    throw std::runtime_error(file.string() + ": cannot open: " + std::strerror(errno));
  }
  Sha256 hash;
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    hash.update(buffer.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) throw std::runtime_error(file.string() + ": read failed: " + std::strerror(errno));
  return hash.hex_digest();
}

}  // namespace lomo
