// Fetches a job's newest committed checkpoint from the coordinator over the worker protocol
// (WorkerService.FetchCheckpoint), so that a job restarted on this worker resumes from where its
// last attempt committed (on any worker). The coordinator serves it only to the worker that owns
// the attempt: the daemon needs no user credentials and does not use the public API's client.
#pragma once

#include <chrono>
#include <string>

#include "daemon/job_runner.h"

namespace lomo::daemon {

class CoordinatorCheckpointFetcher : public CheckpointFetcher {
 public:
  // `deadline`: how long one whole fetch may take (a checkpoint may be many GiB).
  CoordinatorCheckpointFetcher(std::string address, std::string worker_id,
                               std::chrono::milliseconds deadline)
      : address_(std::move(address)), worker_id_(std::move(worker_id)), deadline_(deadline) {}

  // Receives into <checkpoints_dir>/.fetch-step-N (each file verified by its SHA-256 and against
  // the checkpoint's record), renames it to step-N, then points `latest` at it.
  std::optional<int64_t> fetch_latest(const std::string& job_id, int64_t attempt,
                                      const std::filesystem::path& checkpoints_dir) override;

 private:
  std::string address_;
  std::string worker_id_;
  std::chrono::milliseconds deadline_;
};

}  // namespace lomo::daemon
