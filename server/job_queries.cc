#include "server/job_queries.h"

#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "server/job_text.h"

namespace lomo::server {

namespace {

using google::protobuf::util::TimeUtil;

constexpr int kDefaultPageSize = 50;
constexpr int kMaxPageSize = 1000;

// The distinct states of a ListJobs filter, sorted; INVALID_ARGUMENT names a bad entry.
grpc::Status read_state_filter(const v1::ListJobsRequest& request,
                               std::vector<v1::JobState>* states) {
  for (int i = 0; i < request.states_size(); ++i) {
    const auto state = static_cast<v1::JobState>(request.states(i));
    if (state == v1::JOB_STATE_UNSPECIFIED || !v1::JobState_IsValid(state)) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "states[" + std::to_string(i) + "]: not a job state (" +
                              std::to_string(request.states(i)) + ")");
    }
    if (std::find(states->begin(), states->end(), state) == states->end()) {
      states->push_back(state);
    }
  }
  std::sort(states->begin(), states->end());
  return grpc::Status::OK;
}

// The queued job's resources as its stored spec (validated, every field present) says.
void resources_of(const v1::Job& job, v1::DeviceKind* device, int64_t* world_size,
                  int64_t* max_restarts) {
  *device = v1::DEVICE_KIND_CPU;
  *world_size = 1;
  *max_restarts = 0;
  const auto resources = job.spec().fields().find("resources");
  if (resources == job.spec().fields().end()) return;
  const auto& fields = resources->second.struct_value().fields();
  if (const auto it = fields.find("device"); it != fields.end()) {
    *device = it->second.string_value() == "cuda" ? v1::DEVICE_KIND_CUDA : v1::DEVICE_KIND_CPU;
  }
  if (const auto it = fields.find("world_size"); it != fields.end()) {
    *world_size = static_cast<int64_t>(it->second.number_value());
  }
  // A spec stored before max_restarts existed says "retries" (jobspec reads it as the same).
  for (const char* key : {"max_restarts", "retries"}) {
    if (const auto it = fields.find(key); it != fields.end()) {
      *max_restarts = static_cast<int64_t>(it->second.number_value());
    }
  }
}

// "restarting after attempt 1 failed on worker W: REASON (restart 1 of 3)" for a job queued again
// after a failure, or "".
std::string restart_text(const v1::Job& job, int64_t max_restarts) {
  if (job.attempts_size() == 0 || !job.attempts(job.attempts_size() - 1).restarted()) return "";
  const v1::JobAttempt& last = job.attempts(job.attempts_size() - 1);
  int64_t restart = 0;
  for (const v1::JobAttempt& attempt : job.attempts()) restart += attempt.restarted() ? 1 : 0;
  std::string who;
  if (last.assignments_size() == 1) who = " on worker " + last.assignments(0).worker_id();
  return "restarting after attempt " + std::to_string(last.attempt()) + " failed" + who + ": " +
         last.reason() + " (restart " + std::to_string(restart) + " of " +
         std::to_string(max_restarts) + ")";
}

}  // namespace

void JobQueries::explain_wait(v1::Job& job, const QueueHeads& heads) const {
  if (job.state() != v1::JOB_STATE_QUEUED) return;
  v1::DeviceKind device;
  int64_t world_size, max_restarts;
  resources_of(job, &device, &world_size, &max_restarts);
  std::string reason = wait_reason(heads, job.id(), device, world_size);
  if (const std::string restart = restart_text(job, max_restarts); !restart.empty()) {
    const v1::JobAttempt& last = job.attempts(job.attempts_size() - 1);
    const int64_t left_us = TimeUtil::TimestampToMicroseconds(last.restart_time()) -
                            TimeUtil::TimestampToMicroseconds(TimeUtil::GetCurrentTime());
    // Rounded up: "in 0 s" would read as if it had started.
    reason = left_us > 0 ? restart + " in " + std::to_string((left_us + 999999) / 1000000) + " s"
                         : restart + ": " + reason;
  }
  job.set_wait_reason(reason);
}

grpc::Status JobQueries::get_job(const v1::GetJobRequest& request, v1::GetJobResponse* response) {
  if (grpc::Status status = require_job_id(request.job_id()); !status.ok()) return status;
  try {
    std::optional<JobRecord> record = store_.get_job(request.job_id());
    if (!record) return job_not_found(request.job_id());
    *response->mutable_job() = std::move(record->job);
    explain_wait(*response->mutable_job(), *scheduler_.published());
  } catch (const StoreError& error) {
    return internal_error("cannot read job " + request.job_id(), error);
  }
  return grpc::Status::OK;
}

grpc::Status JobQueries::list_jobs(const v1::ListJobsRequest& request,
                                   v1::ListJobsResponse* response, const std::string* owner) {
  if (request.page_size() < 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "page_size: must be >= 0, got " + std::to_string(request.page_size()));
  }
  const int page_size =
      request.page_size() == 0 ? kDefaultPageSize : std::min(request.page_size(), kMaxPageSize);
  std::vector<v1::JobState> states;
  if (grpc::Status status = read_state_filter(request, &states); !status.ok()) return status;
  try {
    JobPage page = store_.list_jobs(states, page_size, request.page_token(), owner);
    const std::shared_ptr<const QueueHeads> heads = scheduler_.published();
    for (v1::Job& job : page.jobs) {
      explain_wait(job, *heads);
      // Specs stay out of lists (GetJob has them): a page of 1000 jobs with specs up to
      // kMaxSpecBytes, three copies each, would pass gRPC's 4 MiB message limit.
      job.clear_spec();
      job.clear_canonical_spec();
      job.clear_original_spec();
      *response->add_jobs() = std::move(job);
    }
    response->set_next_page_token(page.next_page_token);
  } catch (const std::invalid_argument& error) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, error.what());
  } catch (const StoreError& error) {
    return internal_error("cannot list jobs", error);
  }
  return grpc::Status::OK;
}

grpc::Status JobQueries::list_checkpoints(const v1::ListCheckpointsRequest& request,
                                          v1::ListCheckpointsResponse* response) {
  if (grpc::Status status = require_job_id(request.job_id()); !status.ok()) return status;
  try {
    if (!store_.get_job(request.job_id())) return job_not_found(request.job_id());
    for (v1::CheckpointInfo& info : store_.list_checkpoints(request.job_id())) {
      *response->add_checkpoints() = std::move(info);
    }
  } catch (const StoreError& error) {
    return internal_error("cannot list checkpoints of job " + request.job_id(), error);
  }
  return grpc::Status::OK;
}

grpc::Status JobQueries::read_events(const std::string& job_id, int64_t after_sequence, int limit,
                                     EventBatch* batch) {
  if (grpc::Status status = require_job_id(job_id); !status.ok()) return status;
  if (after_sequence < 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "after_sequence: must be >= 0, got " + std::to_string(after_sequence));
  }
  try {
    std::optional<EventBatch> read = store_.events_after(job_id, after_sequence, limit);
    if (!read) return job_not_found(job_id);
    *batch = std::move(*read);
    explain_wait(batch->job.job, *scheduler_.published());
  } catch (const StoreError& error) {
    return internal_error("cannot read events of job " + job_id, error);
  }
  return grpc::Status::OK;
}

grpc::Status JobQueries::find_checkpoint(const std::string& checkpoint_id, v1::CheckpointInfo* info,
                                         std::filesystem::path* directory) {
  if (checkpoint_id.empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "checkpoint_id: required (\"<job id>/step-00000100\")");
  }
  try {
    std::optional<StoredCheckpoint> stored = store_.get_checkpoint(checkpoint_id);
    if (!stored) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "checkpoint " + checkpoint_id +
                                                           " not found (committed checkpoints are "
                                                           "listed by ListCheckpoints)");
    }
    *directory = checkpoints_.checkpoint_dir(stored->job_id, stored->info.step());
    *info = std::move(stored->info);
  } catch (const StoreError& error) {
    return internal_error("cannot read checkpoint " + checkpoint_id, error);
  }
  return grpc::Status::OK;
}

grpc::Status JobQueries::latest_checkpoint(const std::string& job_id, v1::CheckpointInfo* info,
                                           std::filesystem::path* directory, bool* found) {
  *found = false;
  try {
    std::vector<v1::CheckpointInfo> checkpoints = store_.list_checkpoints(job_id);
    if (checkpoints.empty()) return grpc::Status::OK;
    const auto newest =
        std::max_element(checkpoints.begin(), checkpoints.end(),
                         [](const v1::CheckpointInfo& a, const v1::CheckpointInfo& b) {
                           return a.step() < b.step();
                         });
    *directory = checkpoints_.checkpoint_dir(job_id, newest->step());
    *info = std::move(*newest);
    *found = true;
  } catch (const StoreError& error) {
    return internal_error("cannot list checkpoints of job " + job_id, error);
  }
  return grpc::Status::OK;
}

}  // namespace lomo::server
