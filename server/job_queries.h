// Read-only queries: GetJob, ListJobs, ListCheckpoints, a job's events (WatchJob, REST events) and
// a committed checkpoint's files (DownloadCheckpoint). They read the store's reader connections
// and never take the coordinator's lock, so they may run on gRPC's own threads: in WAL mode a
// reader never waits for the writer. A QUEUED job's wait_reason (not stored) comes from the
// scheduler's published queue heads, which need no lock either.
#pragma once

#include <grpcpp/support/status.h>

#include <cstdint>
#include <filesystem>
#include <string>

#include "lomo/v1/jobs.pb.h"
#include "server/checkpoint_store.h"
#include "server/scheduler.h"
#include "server/store.h"

namespace lomo::server {

class JobQueries {
 public:
  JobQueries(Store& store, CheckpointStore& checkpoints, const Scheduler& scheduler)
      : store_(store), checkpoints_(checkpoints), scheduler_(scheduler) {}

  grpc::Status get_job(const v1::GetJobRequest& request, v1::GetJobResponse* response);
  // With `owner`, only that owner's jobs (a user's list).
  grpc::Status list_jobs(const v1::ListJobsRequest& request, v1::ListJobsResponse* response,
                         const std::string* owner = nullptr);
  grpc::Status list_checkpoints(const v1::ListCheckpointsRequest& request,
                                v1::ListCheckpointsResponse* response);
  // The job and up to `limit` of its events after `after_sequence`.
  grpc::Status read_events(const std::string& job_id, int64_t after_sequence, int limit,
                           EventBatch* batch);
  // A committed checkpoint's record and the directory holding its files.
  grpc::Status find_checkpoint(const std::string& checkpoint_id, v1::CheckpointInfo* info,
                               std::filesystem::path* directory);
  // The job's newest committed checkpoint; `*found` false (and OK) when it has none.
  grpc::Status latest_checkpoint(const std::string& job_id, v1::CheckpointInfo* info,
                                 std::filesystem::path* directory, bool* found);

 private:
  // Sets job.wait_reason when the job is QUEUED.
  void explain_wait(v1::Job& job, const QueueHeads& heads) const;

  Store& store_;
  CheckpointStore& checkpoints_;
  const Scheduler& scheduler_;
};

}  // namespace lomo::server
