#include "server/checkpoint_commit.h"

#include <filesystem>
#include <map>
#include <system_error>

#include "common/log.h"
#include "server/timestamps.h"

namespace lomo::server {

void CheckpointCommit::on_chunk(const std::shared_ptr<WorkerConnection>& connection,
                                const v1::CheckpointChunk& chunk) {
  std::string rejection;
  {
    std::lock_guard lock(state_.mu);
    rejection = upload_problem_locked(*connection, chunk);
  }
  // File I/O happens without mu: other jobs' transitions do not wait for a disk write.
  ChunkResult result = state_.checkpoints.receive(connection->id(), chunk, rejection);
  if (!result.commit) return;

  std::string error = result.error;
  {
    std::lock_guard lock(state_.mu);
    if (error.empty()) error = commit_locked(*connection, chunk, *result.verified);
    if (!error.empty()) {
      state_.metrics.count_checkpoint(false, 0);
      log_line("job " + chunk.job_id() + ": checkpoint at step " + std::to_string(chunk.step()) +
               " rejected: " + error);
    }
  }
  acknowledge(connection, chunk, error,
              error.empty() ? result.verified->info.checkpoint_id() : std::string());
}

// A gang restarted because another rank failed: rank 0 may still hold checkpoints its trainer
// wrote before the failure that could not be uploaded yet (the coordinator was away, or the upload
// was queued behind an earlier one). They are the job's newest valid state, so they are committed
// while the job waits for its next attempt (it keeps the ended attempt's number until then), and
// that attempt resumes from them instead of recomputing the steps. Once the next attempt is
// assigned, the ended one's uploads are refused as before.
bool CheckpointCommit::late_rank_zero_upload_locked(const Worker* worker, const std::string& job_id,
                                                    int64_t attempt) const {
  if (worker == nullptr || worker->rank != 0 || worker->job_id != job_id ||
      worker->attempt != attempt) {
    return false;
  }
  const auto it = state_.active.find(job_id);
  if (it == state_.active.end()) return false;
  const v1::Job& job = it->second.record.job;
  return job.attempt() == attempt && job.state() == v1::JOB_STATE_QUEUED;
}

std::string CheckpointCommit::upload_problem_locked(const WorkerConnection& connection,
                                                    const v1::CheckpointChunk& chunk) const {
  const Worker* worker = state_.worker_for_locked(connection);
  if (late_rank_zero_upload_locked(worker, chunk.job_id(), chunk.attempt())) return "";
  std::string problem = state_.ownership_problem_locked(worker, chunk.job_id(), chunk.attempt());
  if (!problem.empty() || worker->rank == 0) return problem;
  // The ranks hold identical replicas (checked by weight hashes): one copy is the checkpoint.
  return "only rank 0 uploads checkpoints; worker " + worker->id + " runs rank " +
         std::to_string(worker->rank) + " of job " + chunk.job_id() + " attempt " +
         std::to_string(chunk.attempt());
}

std::string CheckpointCommit::commit_locked(const WorkerConnection& connection,
                                            const v1::CheckpointChunk& chunk,
                                            const VerifiedUpload& upload) {
  std::string error = upload_problem_locked(connection, chunk);
  if (!error.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(upload.temporary_dir, ignored);
    return error;
  }
  error = state_.checkpoints.publish(upload);
  if (error.empty()) error = record_locked(upload);
  if (!error.empty()) return error;
  state_.metrics.count_events(1);
  state_.metrics.count_checkpoint(true, upload.info.size_bytes());
  log_line("job " + upload.job_id + ": checkpoint " + upload.info.checkpoint_id() + " committed (" +
           std::to_string(upload.info.files_size()) + " files, " +
           std::to_string(upload.info.size_bytes()) + " bytes)");
  apply_retention_locked(upload.job_id);
  state_.hub.publish(upload.job_id);
  return "";
}

void CheckpointCommit::apply_retention_locked(const std::string& job_id) {
  const int keep = state_.options.keep_checkpoints;
  if (keep <= 0) return;
  try {
    const std::vector<v1::CheckpointInfo> checkpoints = state_.store.list_checkpoints(job_id);
    if (checkpoints.size() <= static_cast<size_t>(keep)) return;
    const std::string best = state_.options.keep_best_checkpoint
                                 ? best_checkpoint_locked(job_id, checkpoints)
                                 : std::string();
    // Oldest step first: all but the last `keep` go (and the best, when asked to keep it).
    for (size_t i = 0; i + keep < checkpoints.size(); ++i) {
      const v1::CheckpointInfo& old = checkpoints[i];
      if (old.checkpoint_id() == best) continue;
      state_.store.delete_checkpoint(old.checkpoint_id());
      // Files go once the deletion is durable: a power cut before it must not leave a record
      // whose files are gone (a directory without a record is removed at startup instead).
      CheckpointStore& files = state_.checkpoints;
      const int64_t step = old.step();
      state_.when_durable(
          [&files, job_id, step](const grpc::Status& durable) {
            if (durable.ok()) files.unpublish(job_id, step);
          },
          "deletion of checkpoint " + old.checkpoint_id());
      log_line("job " + job_id + ": checkpoint " + old.checkpoint_id() +
               " deleted (keeping the newest " + std::to_string(keep) +
               (best.empty() ? "" : " and the best by eval loss, " + best) + ")");
    }
  } catch (const StoreError& error) {
    // The new checkpoint is committed either way; the old ones wait for the next commit.
    log_line("error: job " + job_id + ": retention of old checkpoints: " + error.what());
  }
}

std::string CheckpointCommit::best_checkpoint_locked(
    const std::string& job_id, const std::vector<v1::CheckpointInfo>& checkpoints) {
  const std::map<int64_t, double> losses = state_.store.eval_losses(job_id);
  std::string best;
  double best_loss = 0.0;
  for (const v1::CheckpointInfo& checkpoint : checkpoints) {
    const auto it = losses.find(checkpoint.step());
    // No eval at its step, or a NaN one: no claim to be the best. Ties keep the earlier step.
    if (it == losses.end() || !(it->second == it->second)) continue;
    if (best.empty() || it->second < best_loss) {
      best = checkpoint.checkpoint_id();
      best_loss = it->second;
    }
  }
  return best;
}

std::string CheckpointCommit::record_locked(const VerifiedUpload& upload) {
  v1::JobEvent event;
  *event.mutable_time() = now_timestamp();
  v1::CheckpointInfo* info = event.mutable_checkpoint();
  *info = upload.info;
  *info->mutable_commit_time() = event.time();
  try {
    state_.store.insert_checkpoint(upload.job_id, *info, event);
  } catch (const StoreError& exception) {
    state_.checkpoints.unpublish(upload.job_id, upload.step);
    std::string error = std::string("cannot record the checkpoint: ") + exception.what();
    log_line("error: " + error);
    return error;
  }
  return "";
}

void CheckpointCommit::acknowledge(const std::shared_ptr<WorkerConnection>& connection,
                                   const v1::CheckpointChunk& chunk, const std::string& error,
                                   const std::string& checkpoint_id) {
  v1::CoordinatorMessage reply;
  v1::CheckpointAck* ack = reply.mutable_checkpoint_ack();
  ack->set_job_id(chunk.job_id());
  ack->set_step(chunk.step());
  if (!error.empty()) {
    ack->set_committed(false);
    ack->set_error(error);
    connection->send(reply);
    return;
  }
  // The worker may delete its copy once it has the ack: the record must survive a power cut.
  ack->set_committed(true);
  state_.when_durable(
      [connection, reply](const grpc::Status& durable) mutable {
        if (!durable.ok()) {
          reply.mutable_checkpoint_ack()->set_committed(false);
          reply.mutable_checkpoint_ack()->set_error(durable.error_message());
        }
        connection->send(reply);
      },
      "checkpoint " + checkpoint_id);
}

}  // namespace lomo::server
