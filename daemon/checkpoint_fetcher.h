// Fetches a job's newest committed checkpoint from the coordinator's public API, so that a job
// restarted on this worker resumes from where its last attempt committed (on any worker).
#pragma once

#include <chrono>
#include <string>

#include "daemon/job_runner.h"

namespace lomo::daemon {

class CoordinatorCheckpointFetcher : public CheckpointFetcher {
 public:
  CoordinatorCheckpointFetcher(std::string address, std::chrono::milliseconds timeout)
      : address_(std::move(address)), timeout_(timeout) {}

  std::optional<int64_t> fetch_latest(const std::string& job_id,
                                      const std::filesystem::path& checkpoints_dir) override;

 private:
  std::string address_;
  std::chrono::milliseconds timeout_;
};

}  // namespace lomo::daemon
