// Bearer tokens (server/auth.h): made here, stored by the coordinator only as their SHA-256.
#pragma once

#include <filesystem>
#include <string>

namespace lomo {

// "lomo_" + 43 base64url characters from 32 bytes of the kernel's random source. Throws
// std::runtime_error if the kernel has none to give.
std::string new_token();

// Writes `text` to `file` readable by its owner only (0600), through a temporary file and a
// rename. Throws std::runtime_error naming the file.
void write_private_file(const std::filesystem::path& file, const std::string& text);

}  // namespace lomo
