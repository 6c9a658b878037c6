#include "server/checkpoint_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <system_error>
#include <vector>

#include "common/sha256.h"

namespace lomo::server {

namespace fs = std::filesystem;

namespace {

constexpr const char* kTemporaryPrefix = ".tmp-";

std::string step_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
  return name;
}

std::string errno_text() { return std::strerror(errno); }

// fsync on a file or directory: data and the directory entries that name it survive a power cut.
bool sync_path(const fs::path& path, bool directory) {
  const int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

bool write_all(int fd, const std::string& data) {
  size_t written = 0;
  while (written < data.size()) {
    const ssize_t n = ::write(fd, data.data() + written, data.size() - written);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    written += static_cast<size_t>(n);
  }
  return true;
}

void remove_quietly(const fs::path& path) {
  if (path.empty()) return;
  std::error_code ignored;
  fs::remove_all(path, ignored);
}

std::string lowercase(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

}  // namespace

struct CheckpointStore::Upload {
  std::mutex mu;
  uint64_t owner = 0;
  std::string job_id;
  int64_t attempt = 0;
  int64_t step = 0;
  fs::path temporary_dir;
  std::string error;  // the first problem; once set, every later chunk is ignored
  std::vector<v1::CheckpointFile> files;
  std::set<std::string> paths;  // complete or in progress
  // The file being received.
  std::string current_path;
  int fd = -1;
  int64_t current_size = 0;
  std::optional<Sha256> hash;

  ~Upload() { close_file(); }
  void close_file() {
    if (fd >= 0) ::close(fd);
    fd = -1;
    current_path.clear();
    hash.reset();
  }
};

CheckpointStore::CheckpointStore(fs::path root) : root_(std::move(root)) {
  fs::create_directories(root_);
}

CheckpointStore::~CheckpointStore() {
  std::lock_guard lock(mu_);
  for (auto& [key, upload] : uploads_) remove_quietly(upload->temporary_dir);
}

std::string CheckpointStore::checkpoint_id(const std::string& job_id, int64_t step) {
  return job_id + "/" + step_name(step);
}

fs::path CheckpointStore::checkpoint_dir(const std::string& job_id, int64_t step) const {
  return root_ / job_id / step_name(step);
}

int CheckpointStore::recover(const std::set<std::string>& committed) {
  int removed = 0;
  std::error_code error;
  for (const auto& job_dir : fs::directory_iterator(root_, error)) {
    if (!job_dir.is_directory()) continue;
    const std::string job_id = job_dir.path().filename().string();
    std::vector<fs::path> doomed;
    for (const auto& entry : fs::directory_iterator(job_dir.path(), error)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind(kTemporaryPrefix, 0) == 0 || !committed.count(job_id + "/" + name)) {
        doomed.push_back(entry.path());
      }
    }
    for (const fs::path& path : doomed) {
      remove_quietly(path);
      ++removed;
    }
  }
  return removed;
}

std::string CheckpointStore::check_relative_path(const std::string& path) {
  if (path.empty()) return "path is empty";
  if (path.size() > 1024) return "path is longer than 1024 bytes";
  if (path.front() == '/') return "path \"" + path + "\" is absolute";
  if (path.find('\0') != std::string::npos) return "path contains a NUL byte";
  if (path.find('\\') != std::string::npos) return "path \"" + path + "\" contains a backslash";
  size_t start = 0;
  while (start <= path.size()) {
    const size_t end = std::min(path.find('/', start), path.size());
    const std::string part = path.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") {
      return "path \"" + path + "\" must be relative, without empty, '.' or '..' components";
    }
    start = end + 1;
  }
  return "";
}

void CheckpointStore::fail(Upload& upload, const std::string& error) {
  if (!upload.error.empty()) return;
  upload.error = error;
  upload.close_file();
  remove_quietly(upload.temporary_dir);
}

ChunkResult CheckpointStore::receive(uint64_t owner, const v1::CheckpointChunk& chunk,
                                     const std::string& rejection) {
  const std::string key = chunk.job_id() + "/" + std::to_string(chunk.step());
  std::shared_ptr<Upload> upload;
  {
    std::lock_guard lock(mu_);
    auto it = uploads_.find(key);
    if (it != uploads_.end() &&
        (it->second->owner != owner || it->second->attempt != chunk.attempt())) {
      // A new connection or attempt starts the step over; the old upload can never finish.
      std::lock_guard upload_lock(it->second->mu);
      remove_quietly(it->second->temporary_dir);
      uploads_.erase(it);
      it = uploads_.end();
    }
    if (it == uploads_.end()) {
      upload = std::make_shared<Upload>();
      upload->owner = owner;
      upload->job_id = chunk.job_id();
      upload->attempt = chunk.attempt();
      upload->step = chunk.step();
      if (rejection.empty() && chunk.step() >= 0) {
        upload->temporary_dir =
            root_ / chunk.job_id() / (kTemporaryPrefix + step_name(chunk.step()));
        remove_quietly(upload->temporary_dir);  // left by a connection that died mid-upload
      }
      uploads_.emplace(key, upload);
    } else {
      upload = it->second;
    }
  }

  ChunkResult result = receive_locked(*upload, chunk, rejection);
  if (result.commit) {
    // The commit ends the upload either way; a retry of the step starts from scratch.
    std::lock_guard lock(mu_);
    const auto it = uploads_.find(key);
    if (it != uploads_.end() && it->second == upload) uploads_.erase(it);
  }
  return result;
}

ChunkResult CheckpointStore::receive_locked(Upload& upload_ref, const v1::CheckpointChunk& chunk,
                                            const std::string& rejection) {
  Upload* upload = &upload_ref;
  std::lock_guard lock(upload->mu);
  if (!rejection.empty()) fail(*upload, rejection);
  if (chunk.step() < 0) fail(*upload, "step must be >= 0, got " + std::to_string(chunk.step()));

  const bool has_file_data = !chunk.path().empty() || !chunk.data().empty() ||
                             chunk.last_chunk_of_file() || !chunk.sha256().empty();
  if (upload->error.empty() && has_file_data) {
    const std::string& path = chunk.path();
    if (const std::string problem = check_relative_path(path); !problem.empty()) {
      fail(*upload, problem);
    } else if (upload->current_path.empty()) {
      // The first chunk of a file.
      if (upload->paths.count(path)) {
        fail(*upload, "file " + path + ": sent again after its last chunk");
      } else if (chunk.offset() != 0) {
        fail(*upload, "file " + path + ": first chunk at offset " + std::to_string(chunk.offset()) +
                          ", expected 0");
      } else {
        const fs::path file = upload->temporary_dir / path;
        std::error_code error;
        fs::create_directories(file.parent_path(), error);
        upload->fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (error || upload->fd < 0) {
          fail(*upload, "file " + path + ": cannot create on the coordinator: " +
                            (error ? error.message() : errno_text()));
        } else {
          upload->current_path = path;
          upload->current_size = 0;
          upload->hash.emplace();
          upload->paths.insert(path);
        }
      }
    } else if (path != upload->current_path) {
      fail(*upload, "file " + path + ": chunk arrived before the last chunk of " +
                        upload->current_path + " (files are sent one after another)");
    } else if (chunk.offset() != upload->current_size) {
      fail(*upload, "file " + path + ": chunk at offset " + std::to_string(chunk.offset()) +
                        ", expected " + std::to_string(upload->current_size));
    }

    if (upload->error.empty()) {
      if (!write_all(upload->fd, chunk.data())) {
        fail(*upload, "file " + path + ": cannot write on the coordinator: " + errno_text());
      } else {
        upload->hash->update(chunk.data());
        upload->current_size += static_cast<int64_t>(chunk.data().size());
      }
    }

    if (upload->error.empty() && chunk.last_chunk_of_file()) {
      const std::string computed = upload->hash->hex_digest();
      if (!is_sha256_hex(chunk.sha256())) {
        fail(*upload, "file " + path +
                          ": the last chunk must carry the file's SHA-256 as 64 hex "
                          "digits, got \"" +
                          chunk.sha256().substr(0, 80) + "\"");
      } else if (lowercase(chunk.sha256()) != computed) {
        fail(*upload, "file " + path + ": SHA-256 mismatch: the worker sent " +
                          lowercase(chunk.sha256()) + ", the coordinator received " + computed +
                          " (" + std::to_string(upload->current_size) + " bytes)");
      } else if (::fsync(upload->fd) != 0) {
        fail(*upload, "file " + path + ": cannot sync on the coordinator: " + errno_text());
      } else {
        v1::CheckpointFile& file = upload->files.emplace_back();
        file.set_path(path);
        file.set_size_bytes(upload->current_size);
        file.set_sha256(computed);
        upload->close_file();
      }
    }
  }

  ChunkResult result;
  if (!chunk.commit()) return result;
  result.commit = true;
  if (upload->error.empty()) {
    if (!upload->current_path.empty()) {
      fail(*upload, "file " + upload->current_path +
                        " is incomplete: " + std::to_string(upload->current_size) +
                        " bytes received and no last chunk before the commit");
    } else if (upload->files.empty()) {
      fail(*upload, "no files were uploaded for step " + std::to_string(chunk.step()));
    }
  }
  if (upload->error.empty()) {
    // Directory entries of every file (and subdirectory) must be durable before the rename.
    std::set<fs::path> directories{upload->temporary_dir};
    for (const v1::CheckpointFile& file : upload->files) {
      for (fs::path dir = (upload->temporary_dir / file.path()).parent_path();
           dir != upload->temporary_dir && dir.has_relative_path(); dir = dir.parent_path()) {
        directories.insert(dir);
      }
    }
    for (const fs::path& dir : directories) {
      if (!sync_path(dir, /*directory=*/true)) {
        fail(*upload, "cannot sync " + dir.string() + " on the coordinator: " + errno_text());
        break;
      }
    }
  }
  if (upload->error.empty()) {
    VerifiedUpload verified;
    verified.job_id = upload->job_id;
    verified.step = upload->step;
    verified.temporary_dir = upload->temporary_dir;
    verified.info.set_checkpoint_id(checkpoint_id(upload->job_id, upload->step));
    verified.info.set_step(upload->step);
    int64_t total = 0;
    for (const v1::CheckpointFile& file : upload->files) {
      total += file.size_bytes();
      *verified.info.add_files() = file;
    }
    verified.info.set_size_bytes(total);
    result.verified = std::move(verified);
  } else {
    result.error = upload->error;
  }
  return result;
}

std::string CheckpointStore::publish(const VerifiedUpload& upload) {
  const fs::path target = checkpoint_dir(upload.job_id, upload.step);
  std::error_code error;
  if (fs::exists(target, error)) {
    remove_quietly(upload.temporary_dir);
    return "checkpoint " + checkpoint_id(upload.job_id, upload.step) + " is already committed";
  }
  fs::rename(upload.temporary_dir, target, error);
  if (error) {
    remove_quietly(upload.temporary_dir);
    return "cannot move " + upload.temporary_dir.string() + " into place: " + error.message();
  }
  // The rename lives in the job directory, which lives in the root.
  if (!sync_path(target.parent_path(), true) || !sync_path(root_, true)) {
    const std::string text = errno_text();
    remove_quietly(target);
    return "cannot sync " + target.parent_path().string() + ": " + text;
  }
  return "";
}

void CheckpointStore::unpublish(const std::string& job_id, int64_t step) {
  remove_quietly(checkpoint_dir(job_id, step));
}

void CheckpointStore::discard_owner(uint64_t owner) {
  std::lock_guard lock(mu_);
  for (auto it = uploads_.begin(); it != uploads_.end();) {
    if (it->second->owner == owner) {
      std::lock_guard upload_lock(it->second->mu);
      remove_quietly(it->second->temporary_dir);
      it = uploads_.erase(it);
    } else {
      ++it;
    }
  }
}

void CheckpointStore::discard_job(const std::string& job_id) {
  std::lock_guard lock(mu_);
  for (auto it = uploads_.begin(); it != uploads_.end();) {
    if (it->second->job_id == job_id) {
      std::lock_guard upload_lock(it->second->mu);
      remove_quietly(it->second->temporary_dir);
      it = uploads_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace lomo::server
