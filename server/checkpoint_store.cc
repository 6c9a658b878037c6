#include "server/checkpoint_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <system_error>
#include <vector>

#include "common/checkpoint_layout.h"
#include "common/checkpoint_manifest.h"
#include "common/file_transfer.h"
#include "common/sha256.h"

namespace lomo::server {

namespace fs = std::filesystem;

namespace {

std::string errno_text() { return std::strerror(errno); }

std::string lowercase(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

// "" when the files received are exactly those of the commit's manifest, byte for byte (their
// SHA-256 as the receiver computed it from what it wrote); else the first difference, naming the
// file. The manifest file itself may come along unlisted: it cannot list its own digest.
std::string manifest_problem(const std::vector<v1::CheckpointFile>& received,
                             const v1::CheckpointChunk& commit) {
  // A daemon older than manifests sends none: its files are verified by their chunks' digests.
  if (commit.manifest().empty()) return "";
  std::map<std::string, const v1::CheckpointFile*> by_path;
  for (const v1::CheckpointFile& file : received) by_path[file.path()] = &file;
  std::set<std::string> listed;
  for (const v1::CheckpointFile& want : commit.manifest()) {
    if (const std::string problem = transfer_path_problem(want.path()); !problem.empty()) {
      return "the manifest names a bad path: " + problem;
    }
    if (!is_sha256_hex(want.sha256())) {
      return "the manifest's SHA-256 of file " + want.path() + " is malformed";
    }
    listed.insert(want.path());
    const auto it = by_path.find(want.path());
    if (it == by_path.end()) return "file " + want.path() + " is in the manifest but not uploaded";
    if (lowercase(it->second->sha256()) != lowercase(want.sha256()) ||
        it->second->size_bytes() != want.size_bytes()) {
      return "file " + want.path() + " does not match the manifest: received " +
             std::to_string(it->second->size_bytes()) + " bytes with SHA-256 " +
             it->second->sha256() + ", the manifest says " + std::to_string(want.size_bytes()) +
             " bytes with SHA-256 " + want.sha256();
    }
  }
  for (const v1::CheckpointFile& file : received) {
    if (!listed.count(file.path()) && file.path() != kCheckpointManifestFile) {
      return "file " + file.path() + " was uploaded but is not in the manifest";
    }
  }
  return "";
}

// fsync on a file or directory: data and the directory entries that name it survive a power cut.
bool sync_path(const fs::path& path, bool directory) {
  const int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

void remove_quietly(const fs::path& path) {
  if (path.empty()) return;
  std::error_code ignored;
  fs::remove_all(path, ignored);
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
  std::unique_ptr<FileReceiver> receiver;  // created with the first file chunk
};

CheckpointStore::CheckpointStore(fs::path root) : root_(std::move(root)) {
  fs::create_directories(root_);
}

CheckpointStore::~CheckpointStore() {
  std::lock_guard lock(mu_);
  for (auto& [key, upload] : uploads_) remove_quietly(upload->temporary_dir);
}

std::string CheckpointStore::checkpoint_id(const std::string& job_id, int64_t step) {
  return job_id + "/" + checkpoint_directory_name(step);
}

fs::path CheckpointStore::checkpoint_dir(const std::string& job_id, int64_t step) const {
  return checkpoint_directory(root_ / job_id, step);
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
      if (is_temporary_checkpoint_name(name) || !committed.count(job_id + "/" + name)) {
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
  return transfer_path_problem(path);
}

void CheckpointStore::fail(Upload& upload, const std::string& error) {
  if (!upload.error.empty()) return;
  upload.error = error;
  upload.receiver.reset();  // removes the file in progress
  remove_quietly(upload.temporary_dir);
}

void CheckpointStore::abandon(Upload& upload, const std::string& why) {
  // A chunk that found this upload in receive() before the abandon may be waiting for its lock;
  // once it gets the lock it must find the upload failed and write nothing.
  std::lock_guard lock(upload.mu);
  fail(upload, "the upload was abandoned: " + why);
}

void CheckpointStore::set_hook_before_chunk_for_testing(std::function<void()> hook) {
  hook_before_chunk_for_testing_ = std::move(hook);
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
      // A refused chunk (a stale attempt, most likely) must not end another owner's upload.
      if (!rejection.empty()) return ChunkResult{chunk.commit(), rejection, std::nullopt};
      // A new connection or attempt starts the step over; the old upload can never finish.
      abandon(*it->second, "connection " + std::to_string(owner) + " started step " +
                               std::to_string(chunk.step()) + " over");
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
        upload->temporary_dir = temporary_upload_directory(root_ / chunk.job_id(), chunk.step(),
                                                           owner, chunk.attempt());
        remove_quietly(upload->temporary_dir);  // left by a connection that died mid-upload
      }
      uploads_.emplace(key, upload);
    } else {
      upload = it->second;
    }
  }

  if (hook_before_chunk_for_testing_) hook_before_chunk_for_testing_();
  ChunkResult result = receive_locked(*upload, chunk, rejection);
  if (result.commit) {
    // The commit ends the upload either way; a retry of the step starts from scratch.
    std::lock_guard lock(mu_);
    const auto it = uploads_.find(key);
    if (it != uploads_.end() && it->second == upload) uploads_.erase(it);
  }
  return result;
}

ChunkResult CheckpointStore::receive_locked(Upload& upload, const v1::CheckpointChunk& chunk,
                                            const std::string& rejection) {
  std::lock_guard lock(upload.mu);
  if (!rejection.empty()) fail(upload, rejection);
  if (chunk.step() < 0) fail(upload, "step must be >= 0, got " + std::to_string(chunk.step()));
  if (upload.error.empty() && chunk.has_file()) {
    if (!upload.receiver) {
      upload.receiver = std::make_unique<FileReceiver>(upload.temporary_dir, /*sync_files=*/true);
    }
    try {
      upload.receiver->accept(chunk.file());
    } catch (const TransferError& error) {
      fail(upload, error.what());
    }
  }
  if (!chunk.commit()) return ChunkResult{};
  return commit_locked(upload, chunk);
}

ChunkResult CheckpointStore::commit_locked(Upload& upload, const v1::CheckpointChunk& commit) {
  if (upload.error.empty()) {
    try {
      if (upload.receiver) upload.receiver->finish();
    } catch (const TransferError& error) {
      fail(upload, std::string(error.what()) + " before the commit");
    }
  }
  if (upload.error.empty() && (!upload.receiver || upload.receiver->files().empty())) {
    fail(upload, "no files were uploaded for step " + std::to_string(upload.step));
  }
  if (upload.error.empty()) {
    if (const std::string problem = manifest_problem(upload.receiver->files(), commit);
        !problem.empty()) {
      fail(upload, problem);
    }
  }
  if (upload.error.empty()) sync_directories(upload);
  ChunkResult result;
  result.commit = true;
  if (!upload.error.empty()) {
    result.error = upload.error;
    return result;
  }
  VerifiedUpload verified;
  verified.job_id = upload.job_id;
  verified.step = upload.step;
  verified.temporary_dir = upload.temporary_dir;
  verified.info.set_checkpoint_id(checkpoint_id(upload.job_id, upload.step));
  verified.info.set_step(upload.step);
  int64_t total = 0;
  for (const v1::CheckpointFile& file : upload.receiver->files()) {
    total += file.size_bytes();
    *verified.info.add_files() = file;
  }
  verified.info.set_size_bytes(total);
  result.verified = std::move(verified);
  return result;
}

void CheckpointStore::sync_directories(Upload& upload) {
  // Directory entries of every file (and subdirectory) must be durable before the rename.
  std::set<fs::path> directories{upload.temporary_dir};
  for (const v1::CheckpointFile& file : upload.receiver->files()) {
    for (fs::path dir = (upload.temporary_dir / file.path()).parent_path();
         dir != upload.temporary_dir && dir.has_relative_path(); dir = dir.parent_path()) {
      directories.insert(dir);
    }
  }
  for (const fs::path& dir : directories) {
    if (!sync_path(dir, /*directory=*/true)) {
      fail(upload, "cannot sync " + dir.string() + " on the coordinator: " + errno_text());
      return;
    }
  }
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
      abandon(*it->second, "connection " + std::to_string(owner) + " closed");
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
      abandon(*it->second, "job " + job_id + " ended");
      it = uploads_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace lomo::server
