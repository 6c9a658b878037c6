// Job lifecycle: the state machine of every job, and where jobs meet workers.
//
// States: QUEUED → ASSIGNED (sent to a worker, attempt + 1) → RUNNING (the worker says so) →
// SUCCEEDED | FAILED | CANCELLED. Cancel ends a queued job at once and asks the worker to stop an
// assigned or running one (CANCELLED when it confirms, or when it dies). Every transition is one
// store transaction with its StateChange event, committed before anyone is told about it, and is
// mirrored in memory, metrics and the scheduler in the same critical section (commit_locked).
// Gang scheduling and restarts (a job's attempt on several workers; a failed attempt re-queued
// within its budget) belong here: dispatch_locked and end_orphaned_job_locked are the places.
#pragma once

#include <grpcpp/support/status.h>

#include <string>
#include <vector>

#include "lomo/v1/jobs.pb.h"
#include "server/coordinator_state.h"

namespace lomo::server {

class JobLifecycle {
 public:
  explicit JobLifecycle(CoordinatorState& state) : state_(state) {}

  // Startup: loads QUEUED, ASSIGNED and RUNNING jobs from the store. Queued jobs are queued
  // again; assigned and running ones wait heartbeat_timeout for their worker to reconnect; a job
  // whose stored spec or worker no longer makes sense fails with the reason. Takes mu.
  void restore();

  // SubmitJob and CancelJob up to their commit (not yet durable). Take mu.
  grpc::Status submit(const v1::SubmitJobRequest& request, v1::SubmitJobResponse* response);
  grpc::Status cancel(const v1::CancelJobRequest& request, v1::CancelJobResponse* response);

  // Persists `updated` (a changed copy of active.record) with a StateChange event when the state
  // changed, plus `extra` events; then updates memory, metrics and the scheduler, and frees the
  // worker of a job that ended. `active` is invalid afterwards if the job ended. Requires mu.
  grpc::Status commit_locked(ActiveJob& active, JobRecord updated, const std::string& reason,
                             std::vector<v1::JobEvent> extra = {});
  // Ends an assigned or running job whose worker is gone: CANCELLED if a cancel was pending,
  // else FAILED with `reason`. Requires mu.
  void end_orphaned_job_locked(Worker& worker, const std::string& reason);
  // Assigns queued jobs to idle workers while both exist. Requires mu.
  void dispatch_locked();

 private:
  enum class Restored { kQueued, kWaitingForWorker, kFailed };
  Restored restore_job_locked(const JobRecord& record, Clock::time_point now);
  // Why a restored ASSIGNED/RUNNING job cannot wait for its worker, or "" once it does.
  std::string wait_for_worker_locked(const JobRecord& record, Clock::time_point now);
  // Stores a new QUEUED job under a fresh random id (retrying a collision); INTERNAL when the
  // store fails.
  grpc::Status insert_new_job_locked(JobRecord& record, std::vector<v1::JobEvent>& events);
  // The state-change bookkeeping after a commit: metrics, log line, scheduler, hub.
  void after_commit_locked(ActiveJob& active, JobRecord updated, v1::JobState before,
                           const std::string& reason);
  // Sends one placement to its worker; false when the store refused the assignment.
  bool assign_locked(ActiveJob& job, Worker& worker);
  // CancelJob for a job that is no longer active: its stored state answers.
  grpc::Status cancel_inactive(const std::string& job_id, v1::CancelJobResponse* response);
  // CancelJob for an assigned or running job: record the request and tell the worker.
  grpc::Status request_cancel_locked(ActiveJob& active);

  CoordinatorState& state_;
};

}  // namespace lomo::server
