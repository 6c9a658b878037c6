// Checkpoint commit: a worker's checkpoint upload becomes a committed checkpoint. Chunks are
// verified and written by the CheckpointStore without the coordinator's lock (other jobs'
// transitions do not wait for a disk write); the commit chunk is then checked again under the lock
// (the uploading worker must still own the attempt), the directory is published and the
// checkpoint recorded in the store, and the worker gets exactly one CheckpointAck: committed=true
// only once the record is durable against a power cut, since the worker may then delete its copy.
// In a gang only rank 0 uploads; another rank's upload is refused with that rule as its error.
// After a commit, only the newest --keep-checkpoints of the job are kept.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lomo/v1/workers.pb.h"
#include "server/coordinator_state.h"

namespace lomo::server {

class CheckpointCommit {
 public:
  explicit CheckpointCommit(CoordinatorState& state) : state_(state) {}

  // One CheckpointChunk from the worker stream, in stream order. Takes mu (briefly, twice).
  void on_chunk(const std::shared_ptr<WorkerConnection>& connection,
                const v1::CheckpointChunk& chunk);

 private:
  // Why this stream may not upload to (job, attempt), or "": it must run rank 0 of that attempt.
  // Requires mu.
  // Rank 0 of a gang attempt that ended in a restart, uploading what it wrote before the end,
  // while the job waits for its next attempt.
  bool late_rank_zero_upload_locked(const Worker* worker, const std::string& job_id,
                                    int64_t attempt) const;
  std::string upload_problem_locked(const WorkerConnection& connection,
                                    const v1::CheckpointChunk& chunk) const;
  // Publishes and records a verified upload if its worker still owns the attempt; returns the
  // reason it was not committed, or "". Requires mu.
  std::string commit_locked(const WorkerConnection& connection, const v1::CheckpointChunk& chunk,
                            const VerifiedUpload& upload);
  // Records a published checkpoint with its event; returns the error, or "". Requires mu.
  std::string record_locked(const VerifiedUpload& upload);
  // Retention after a commit: deletes the job's committed checkpoints beyond the newest
  // options.keep_checkpoints, record first and then, once that is durable, files (a crash
  // between leaves a directory without a record, which CheckpointStore::recover removes). The
  // newest is always kept, and a new attempt resumes from the newest at its start; a newer commit
  // means the attempt that resumed from an older one has moved past it. Requires mu.
  // With options.keep_best_checkpoint the checkpoint with the lowest eval loss at its step is
  // kept too, however old.
  void apply_retention_locked(const std::string& job_id);
  // The id of the checkpoint among `checkpoints` whose step has the lowest eval loss, or "" when
  // none was evaluated at its step. Requires mu.
  std::string best_checkpoint_locked(const std::string& job_id,
                                     const std::vector<v1::CheckpointInfo>& checkpoints);
  // Sends the CheckpointAck: at once for a rejection, after the durability sync for a commit.
  void acknowledge(const std::shared_ptr<WorkerConnection>& connection,
                   const v1::CheckpointChunk& chunk, const std::string& error,
                   const std::string& checkpoint_id);

  CoordinatorState& state_;
};

}  // namespace lomo::server
