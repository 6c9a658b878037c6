#include "daemon/checkpoint_uploader.h"

#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <vector>

#include "common/checkpoint_manifest.h"
#include "common/file_transfer.h"
#include "common/log.h"

namespace lomo::daemon {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

std::string mib(int64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f MiB", static_cast<double>(bytes) / 1048576.0);
  return text;
}

}  // namespace

CheckpointUploader::CheckpointUploader(std::string job_id, int64_t attempt, ChunkChannel& channel,
                                       UploaderOptions options)
    : job_id_(std::move(job_id)), attempt_(attempt), channel_(channel), options_(options) {
  thread_ = std::thread([this] { run(); });
}

CheckpointUploader::~CheckpointUploader() {
  abandon();
  if (thread_.joinable()) thread_.join();
}

void CheckpointUploader::offer(int64_t step, const fs::path& directory) {
  std::lock_guard lock(mutex_);
  pending_ = Target{step, directory};
  changed_.notify_all();
}

void CheckpointUploader::on_ack(const lomo::v1::CheckpointAck& ack) {
  if (ack.job_id() != job_id_) return;
  std::lock_guard lock(mutex_);
  acks_[ack.step()] = ack;
  changed_.notify_all();
}

void CheckpointUploader::abandon() {
  std::lock_guard lock(mutex_);
  abandoned_ = true;
  changed_.notify_all();
}

bool CheckpointUploader::abandoned() const {
  std::lock_guard lock(mutex_);
  return abandoned_;
}

int64_t CheckpointUploader::last_committed_step() const {
  std::lock_guard lock(mutex_);
  return last_committed_step_;
}

int64_t CheckpointUploader::bytes_sent() const {
  std::lock_guard lock(mutex_);
  return bytes_sent_;
}

CheckpointUploader::Outcome CheckpointUploader::wait_idle(Clock::time_point until,
                                                          std::string* error) {
  std::unique_lock lock(mutex_);
  if (!changed_.wait_until(lock, until, [&] { return (!pending_ && !busy_) || abandoned_; })) {
    return Outcome::kTimedOut;
  }
  if (pending_ || busy_) return Outcome::kTimedOut;  // abandoned with work left
  if (last_error_) {
    if (error != nullptr) *error = *last_error_;
    return Outcome::kFailed;
  }
  return Outcome::kDone;
}

void CheckpointUploader::run() {
  while (true) {
    Target target;
    {
      std::unique_lock lock(mutex_);
      changed_.wait(lock, [&] { return pending_.has_value() || abandoned_; });
      if (abandoned_) return;
      target = *pending_;
      pending_.reset();
      busy_ = true;
      acks_.erase(target.step);
    }
    const std::string name = target.directory.filename().string();
    std::optional<std::string> failure;
    bool committed = false;
    int rejections = 0;
    while (!committed && !failure && !abandoned()) {
      const uint64_t generation = channel_.wait_connected(Clock::now() + std::chrono::seconds(1));
      if (generation == 0) continue;
      int64_t total_bytes = 0;
      try {
        if (!send_checkpoint(target, generation, &total_bytes)) continue;
      } catch (const ManifestMismatch& e) {
        // Corrupted after the trainer committed it: retrying would send the same wrong bytes.
        failure = "checkpoint " + name + " is not uploaded: it no longer matches its " +
                  kCheckpointManifestFile + " (" + e.what() + ")";
        report_failure(*failure, generation);
        break;
      } catch (const std::exception& e) {
        failure = "checkpoint " + name + " could not be read for upload: " + e.what();
        report_failure(*failure, generation);
        break;
      }
      const auto ack_until =
          Clock::now() + options_.ack_timeout + std::chrono::seconds(total_bytes / (100 << 20));
      const std::optional<lomo::v1::CheckpointAck> ack =
          wait_ack(target.step, generation, ack_until);
      if (!ack) {
        if (abandoned() || channel_.generation() != generation) continue;  // retry on reconnect
        ++rejections;
        log_line("checkpoint " + name + ": no answer from the coordinator within the deadline");
        if (rejections >= options_.max_rejections) {
          failure = "checkpoint " + name + " upload was never acknowledged by the coordinator";
        }
        continue;
      }
      if (ack->committed()) {
        committed = true;
        log_line("checkpoint " + name + " committed on the coordinator (" + mib(total_bytes) + ")");
        break;
      }
      ++rejections;
      log_line("checkpoint " + name + " rejected by the coordinator: " + ack->error());
      if (rejections >= options_.max_rejections) {
        failure = "checkpoint " + name + " upload rejected by the coordinator: " + ack->error();
      }
    }
    std::lock_guard lock(mutex_);
    if (committed) {
      last_committed_step_ = std::max(last_committed_step_, target.step);
      last_error_.reset();
    } else if (failure) {
      last_error_ = *failure;
    }
    busy_ = false;
    changed_.notify_all();
  }
}

void CheckpointUploader::report_failure(const std::string& failure, uint64_t generation) {
  log_line(failure);
  lomo::v1::WorkerMessage message;
  lomo::v1::JobEvents* events = message.mutable_events();
  events->set_job_id(job_id_);
  events->set_attempt(attempt_);
  lomo::v1::JobEvent* event = events->add_events();
  *event->mutable_time() = google::protobuf::util::TimeUtil::GetCurrentTime();
  event->mutable_log()->set_text("lomo-worker: " + failure);
  channel_.send(std::move(message), generation);  // best effort: the job's end names it too
}

// The files to send and the manifest that goes with the commit. With a manifest, only its files
// (and the manifest itself) are sent, each checked against its digest as it is read; without one
// (a checkpoint written before manifests existed), whatever is in the directory.
std::vector<TransferFile> CheckpointUploader::files_to_send(
    const fs::path& directory, std::vector<lomo::v1::CheckpointFile>* manifest) {
  const std::optional<std::vector<ManifestEntry>> entries = read_checkpoint_manifest(directory);
  if (!entries) return list_transfer_files(directory);
  std::vector<TransferFile> files;
  for (const ManifestEntry& entry : *entries) {
    files.push_back({entry.path, entry.size_bytes, entry.sha256});
    lomo::v1::CheckpointFile& file = manifest->emplace_back();
    file.set_path(entry.path);
    file.set_size_bytes(entry.size_bytes);
    file.set_sha256(entry.sha256);
  }
  std::error_code error;
  const auto manifest_size = fs::file_size(directory / kCheckpointManifestFile, error);
  if (error) throw ManifestError(std::string(kCheckpointManifestFile) + ": " + error.message());
  files.push_back({kCheckpointManifestFile, static_cast<int64_t>(manifest_size), ""});
  return files;
}

bool CheckpointUploader::send_checkpoint(const Target& target, uint64_t generation,
                                         int64_t* total_bytes) {
  std::vector<lomo::v1::CheckpointFile> manifest;
  std::vector<TransferFile> files = files_to_send(target.directory, &manifest);
  int64_t size = 0;
  for (const TransferFile& file : files) size += file.size_bytes;
  log_line("uploading checkpoint " + target.directory.filename().string() + " (" +
           std::to_string(files.size()) + " files, " + mib(size) + ")");
  FileSender sender(target.directory, std::move(files), options_.chunk_bytes);
  while (true) {
    std::optional<lomo::v1::FileChunk> file_chunk;
    try {
      file_chunk = sender.next();
    } catch (const TransferError& e) {
      if (manifest.empty()) throw;
      throw ManifestMismatch(e.what());
    }
    if (!file_chunk) break;
    if (abandoned()) return false;
    const auto bytes = static_cast<int64_t>(file_chunk->data().size());
    lomo::v1::WorkerMessage message;
    auto* chunk = message.mutable_checkpoint_chunk();
    chunk->set_job_id(job_id_);
    chunk->set_attempt(attempt_);
    chunk->set_step(target.step);
    *chunk->mutable_file() = std::move(*file_chunk);
    if (!channel_.send(std::move(message), generation)) return false;
    std::lock_guard lock(mutex_);
    bytes_sent_ += bytes;
  }
  lomo::v1::WorkerMessage commit;
  auto* chunk = commit.mutable_checkpoint_chunk();
  chunk->set_job_id(job_id_);
  chunk->set_attempt(attempt_);
  chunk->set_step(target.step);
  chunk->set_commit(true);
  for (lomo::v1::CheckpointFile& file : manifest) *chunk->add_manifest() = std::move(file);
  if (!channel_.send(std::move(commit), generation)) return false;
  *total_bytes = size;
  return true;
}

std::optional<lomo::v1::CheckpointAck> CheckpointUploader::wait_ack(int64_t step,
                                                                    uint64_t generation,
                                                                    Clock::time_point until) {
  std::unique_lock lock(mutex_);
  while (true) {
    const auto it = acks_.find(step);
    if (it != acks_.end()) {
      lomo::v1::CheckpointAck ack = it->second;
      acks_.erase(it);
      return ack;
    }
    if (abandoned_ || Clock::now() >= until) return std::nullopt;
    lock.unlock();
    const bool same_connection = channel_.generation() == generation;
    lock.lock();
    if (!same_connection) return std::nullopt;
    changed_.wait_for(lock, std::chrono::milliseconds(200));
  }
}

}  // namespace lomo::daemon
