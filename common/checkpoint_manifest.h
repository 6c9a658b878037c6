// The manifest of a checkpoint: lomo_manifest.json inside the checkpoint directory, listing every
// other file of it with its size and SHA-256. The trainer writes it as the last file before the
// checkpoint's atomic rename, so a committed checkpoint always carries the digests its files had
// when they were written. Every later reader checks against it: the trainer on resume, the worker
// daemon before and while uploading (the digests travel with the commit, and the coordinator
// refuses bytes that differ), and lomoctl download before renaming its copy into place. Corruption
// between the write and any of these reads is then refused with the file's name, never passed on.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace lomo {

// Named so that it cannot collide with a Hugging Face model file.
inline constexpr const char* kCheckpointManifestFile = "lomo_manifest.json";

struct ManifestEntry {
  std::string path;  // relative to the checkpoint directory, '/'-separated
  int64_t size_bytes = 0;
  std::string sha256;  // 64 lower-case hex digits
};

// A manifest that cannot be read or parsed, or a file that does not match it; what() names the
// file.
class ManifestError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Every regular file under `directory` (recursively) except the manifest itself, sorted by path,
// with its size and SHA-256 as it is on disk now. Throws ManifestError when a file cannot be read.
std::vector<ManifestEntry> compute_checkpoint_manifest(const std::filesystem::path& directory);

// Computes the manifest of `directory` and writes it there atomically (temporary file, fsync,
// rename). Returns what it wrote. Throws ManifestError or std::system_error.
std::vector<ManifestEntry> write_checkpoint_manifest(const std::filesystem::path& directory);

// The manifest in `directory`, nullopt when it has none (a checkpoint written before manifests
// existed). Throws ManifestError when it exists but is unreadable or malformed.
std::optional<std::vector<ManifestEntry>> read_checkpoint_manifest(
    const std::filesystem::path& directory);

// "" when every entry of `manifest` exists under `directory` with its size and SHA-256; else the
// first difference, naming the file ("model.safetensors: its SHA-256 on disk is …, the manifest
// says …"). Files that the manifest does not list are not looked at.
std::string checkpoint_manifest_mismatch(const std::filesystem::path& directory,
                                         const std::vector<ManifestEntry>& manifest);

}  // namespace lomo
