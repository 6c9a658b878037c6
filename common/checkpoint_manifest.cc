#include "common/checkpoint_manifest.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <system_error>

#include "common/atomic_file.h"
#include "common/read_file.h"
#include "common/sha256.h"

namespace lomo {
namespace fs = std::filesystem;
namespace {

// Paths in a manifest must stay inside the checkpoint: the same rule as a transfer's paths.
bool is_safe_relative_path(const std::string& path) {
  if (path.empty() || path.size() > 1024 || path.front() == '/') return false;
  if (path.find('\\') != std::string::npos || path.find('\0') != std::string::npos) return false;
  size_t start = 0;
  while (start <= path.size()) {
    const size_t end = std::min(path.find('/', start), path.size());
    const std::string part = path.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") return false;
    start = end + 1;
  }
  return true;
}

ManifestEntry parse_entry(const nlohmann::json& j) {
  ManifestEntry entry;
  entry.path = j.at("path").get<std::string>();
  entry.size_bytes = j.at("size_bytes").get<int64_t>();
  entry.sha256 = j.at("sha256").get<std::string>();
  if (!is_safe_relative_path(entry.path)) {
    throw std::out_of_range("path '" + entry.path + "' is not a relative path inside it");
  }
  if (entry.size_bytes < 0) throw std::out_of_range(entry.path + ": negative size");
  if (!is_sha256_hex(entry.sha256)) throw std::out_of_range(entry.path + ": malformed SHA-256");
  return entry;
}

std::string lowercase(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

}  // namespace

std::vector<ManifestEntry> compute_checkpoint_manifest(const fs::path& directory) {
  std::vector<ManifestEntry> entries;
  std::error_code error;
  for (fs::recursive_directory_iterator it(directory, error), end; !error && it != end;
       it.increment(error)) {
    if (!it->is_regular_file()) continue;
    const std::string path = fs::relative(it->path(), directory).generic_string();
    if (path == kCheckpointManifestFile) continue;
    try {
      entries.push_back({path, static_cast<int64_t>(it->file_size()), sha256_file_hex(it->path())});
    } catch (const std::exception& e) {
      throw ManifestError("checkpoint " + directory.string() + ": " + e.what());
    }
  }
  if (error) {
    throw ManifestError("checkpoint " + directory.string() +
                        ": cannot list it: " + error.message());
  }
  std::sort(entries.begin(), entries.end(),
            [](const ManifestEntry& a, const ManifestEntry& b) { return a.path < b.path; });
  return entries;
}

std::vector<ManifestEntry> write_checkpoint_manifest(const fs::path& directory) {
  std::vector<ManifestEntry> entries = compute_checkpoint_manifest(directory);
  nlohmann::json files = nlohmann::json::array();
  for (const ManifestEntry& e : entries) {
    files.push_back({{"path", e.path}, {"size_bytes", e.size_bytes}, {"sha256", e.sha256}});
  }
  const nlohmann::json manifest = {{"format", 1}, {"files", files}};
  write_file_atomically(directory / kCheckpointManifestFile, manifest.dump(2) + "\n");
  return entries;
}

std::optional<std::vector<ManifestEntry>> read_checkpoint_manifest(const fs::path& directory) {
  const fs::path file = directory / kCheckpointManifestFile;
  std::error_code error;
  if (!fs::exists(file, error) && !error) return std::nullopt;
  std::string bytes;
  try {
    bytes = read_file(file);
  } catch (const FileReadError& e) {
    throw ManifestError(file.string() + ": cannot read the checkpoint manifest (" + e.reason() +
                        ")");
  }
  try {
    const nlohmann::json j = nlohmann::json::parse(bytes);
    if (j.at("format").get<int>() != 1) {
      throw std::out_of_range("format " + j.at("format").dump() + " is not 1");
    }
    std::vector<ManifestEntry> entries;
    for (const nlohmann::json& entry : j.at("files")) entries.push_back(parse_entry(entry));
    return entries;
  } catch (const nlohmann::json::exception& e) {
    throw ManifestError(file.string() + ": malformed checkpoint manifest: " + e.what());
  } catch (const std::out_of_range& e) {
    throw ManifestError(file.string() + ": malformed checkpoint manifest: " + e.what());
  }
}

std::string checkpoint_manifest_mismatch(const fs::path& directory,
                                         const std::vector<ManifestEntry>& manifest) {
  for (const ManifestEntry& entry : manifest) {
    const fs::path file = directory / entry.path;
    std::error_code error;
    const auto size = fs::file_size(file, error);
    if (error) return entry.path + ": listed in the manifest but " + error.message();
    if (static_cast<int64_t>(size) != entry.size_bytes) {
      return entry.path + ": it has " + std::to_string(size) +
             " bytes on disk, the manifest says " + std::to_string(entry.size_bytes);
    }
    std::string digest;
    try {
      digest = sha256_file_hex(file);
    } catch (const std::exception& e) {
      return entry.path + ": " + e.what();
    }
    if (digest != lowercase(entry.sha256)) {
      return entry.path + ": its SHA-256 on disk is " + digest + ", the manifest says " +
             entry.sha256;
    }
  }
  return "";
}

}  // namespace lomo
