// Uploads a job attempt's committed checkpoints to the coordinator over the worker stream: the
// checkpoint's files as a chunked transfer (common/file_transfer.h's FileSender: chunks of at most
// 1 MiB, the last chunk of each file carrying the file's SHA-256), then a commit message; the
// coordinator answers with a CheckpointAck. A broken connection restarts the upload on the next
// one; a rejection is retried a few times and then reported. A checkpoint with a manifest
// (common/checkpoint_manifest.h) is uploaded against it: its files are checked against their
// digests as they are read, and the manifest goes with the commit for the coordinator to check
// what it received. A file that no longer matches (corrupted after the trainer wrote it) ends that
// checkpoint's upload without a commit, never retried, with a log event naming the file.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/file_transfer.h"
#include "lomo/v1/workers.pb.h"

namespace lomo::daemon {

// How the uploader reaches the coordinator (the Session and Outbox in the daemon; a fake in tests).
class ChunkChannel {
 public:
  virtual ~ChunkChannel() = default;
  // The open connection's generation, waiting for one until `until`; 0 if there is none by then.
  virtual uint64_t wait_connected(std::chrono::steady_clock::time_point until) = 0;
  virtual uint64_t generation() = 0;
  // Queues `message` on connection `generation` (may block for backpressure); false if that
  // connection has ended.
  virtual bool send(lomo::v1::WorkerMessage message, uint64_t generation) = 0;
};

struct UploaderOptions {
  size_t chunk_bytes = 1u << 20;
  int max_rejections = 3;  // attempts per checkpoint the coordinator may reject before giving up
  // Waiting for the CheckpointAck after the commit: this plus one second per 100 MiB uploaded
  // (the coordinator verifies every byte before it answers).
  std::chrono::milliseconds ack_timeout{60000};
};

class CheckpointUploader {
 public:
  enum class Outcome { kDone, kFailed, kTimedOut };

  CheckpointUploader(std::string job_id, int64_t attempt, ChunkChannel& channel,
                     UploaderOptions options = {});
  ~CheckpointUploader();  // abandon()
  CheckpointUploader(const CheckpointUploader&) = delete;
  CheckpointUploader& operator=(const CheckpointUploader&) = delete;

  // A checkpoint directory the trainer has committed. If an earlier offer has not started
  // uploading yet, this one replaces it: only the newest checkpoint is worth the bandwidth.
  void offer(int64_t step, const std::filesystem::path& directory);
  void on_ack(const lomo::v1::CheckpointAck& ack);
  // Waits until every offered checkpoint is committed or given up on, or until `until`.
  // kFailed: the newest checkpoint was given up on (`error` says why).
  Outcome wait_idle(std::chrono::steady_clock::time_point until, std::string* error);
  // Stops: an upload in progress ends at its next chunk.
  void abandon();

  int64_t last_committed_step() const;
  int64_t bytes_sent() const;

 private:
  struct Target {
    int64_t step = 0;
    std::filesystem::path directory;
  };
  // A file on disk differs from the checkpoint's manifest.
  class ManifestMismatch : public std::runtime_error {
   public:
    using std::runtime_error::runtime_error;
  };
  void run();
  // Logs why a checkpoint is given up on, here and (best effort) as a job event.
  void report_failure(const std::string& failure, uint64_t generation);
  static std::vector<TransferFile> files_to_send(const std::filesystem::path& directory,
                                                 std::vector<lomo::v1::CheckpointFile>* manifest);
  // One pass over the checkpoint on connection `generation`. Returns false if the connection
  // ended (or abandon()) before the commit message was queued; throws on a read error.
  bool send_checkpoint(const Target& target, uint64_t generation, int64_t* total_bytes);
  // Ack for `step`, waiting until `until`, abandon(), or the connection leaving `generation`.
  std::optional<lomo::v1::CheckpointAck> wait_ack(int64_t step, uint64_t generation,
                                                  std::chrono::steady_clock::time_point until);
  bool abandoned() const;

  const std::string job_id_;
  const int64_t attempt_;
  ChunkChannel& channel_;
  const UploaderOptions options_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<Target> pending_;
  bool busy_ = false;
  bool abandoned_ = false;
  std::map<int64_t, lomo::v1::CheckpointAck> acks_;
  int64_t last_committed_step_ = -1;
  std::optional<std::string> last_error_;  // of the newest checkpoint that was given up on
  int64_t bytes_sent_ = 0;
  std::thread thread_;
};

}  // namespace lomo::daemon
