#include "server/job_lifecycle.h"

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>

#include "common/log.h"
#include "jobspec/job_spec.h"
#include "jobspec/proto/spec_proto.h"
#include "server/job_text.h"
#include "server/timestamps.h"

namespace lomo::server {

namespace {

using google::protobuf::util::TimeUtil;

v1::DeviceKind device_kind(const std::string& device) {
  if (device == "cpu") return v1::DEVICE_KIND_CPU;
  if (device == "cuda") return v1::DEVICE_KIND_CUDA;
  return v1::DEVICE_KIND_UNSPECIFIED;
}

// The one place a spec enters the system: parsed and validated with its overrides, kept as
// submitted and as canonical YAML. INVALID_ARGUMENT lists every problem with its field ("invalid
// job spec: optimizer.lr: must be > 0, got -1; training.steps: ...").
grpc::Status read_spec(const v1::SubmitJobRequest& request, SubmittedSpec* submitted) {
  try {
    *submitted = read_submitted_spec(request);
  } catch (const JobSpecError& error) {
    return grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        "invalid job spec: " + spec_problems_for_api(error, spec_lines_are_meaningful(request)));
  }
  return grpc::Status::OK;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Startup.

void JobLifecycle::restore() {
  std::lock_guard lock(state_.mu);
  const auto jobs = state_.store.jobs_in_states(
      {v1::JOB_STATE_QUEUED, v1::JOB_STATE_ASSIGNED, v1::JOB_STATE_RUNNING});
  const Clock::time_point now = Clock::now();
  int queued = 0, waiting = 0;
  for (const JobRecord& record : jobs) {
    switch (restore_job_locked(record, now)) {
      case Restored::kQueued:
        ++queued;
        break;
      case Restored::kWaitingForWorker:
        ++waiting;
        break;
      case Restored::kFailed:
        break;
    }
  }
  log_line("restored " + std::to_string(queued) + " queued jobs and " + std::to_string(waiting) +
           " jobs waiting for their workers to reconnect");
}

JobLifecycle::Restored JobLifecycle::restore_job_locked(const JobRecord& record,
                                                        Clock::time_point now) {
  const std::string& id = record.job.id();
  ActiveJob& active = state_.active[id];
  active.record = record;
  std::string problem;
  try {
    // A job stored before canonical specs existed has only the Struct: its canonical form is
    // made here, so that its assignment carries one like every other.
    const JobSpec spec = stored_job_spec(record.job, "spec");
    active.device = device_kind(spec.resources.device);
    if (active.record.job.canonical_spec().empty()) {
      active.record.job.set_canonical_spec(job_spec_to_yaml(spec));
    }
  } catch (const JobSpecError& error) {
    problem = "the stored spec is no longer valid: " + spec_problems_for_api(error, false);
  }
  if (problem.empty() && record.job.state() != v1::JOB_STATE_QUEUED) {
    problem = wait_for_worker_locked(record, now);
    if (problem.empty()) return Restored::kWaitingForWorker;
  }
  if (!problem.empty()) {
    JobRecord updated = record;
    updated.job.set_state(v1::JOB_STATE_FAILED);
    updated.job.set_failure_reason(problem);
    *updated.job.mutable_end_time() = now_timestamp();
    if (!commit_locked(active, updated, problem).ok()) state_.active.erase(id);
    return Restored::kFailed;
  }
  state_.scheduler.add_job(id, record.job.priority(), record.submit_order, active.device);
  return Restored::kQueued;
}

std::string JobLifecycle::wait_for_worker_locked(const JobRecord& record, Clock::time_point now) {
  const std::string& worker_id = record.job.worker_id();
  if (worker_id.empty()) {
    return "the store names no worker for this " + state_name(record.job.state()) + " job";
  }
  Worker& worker = state_.workers[worker_id];
  if (!worker.job_id.empty()) {
    return "the store names worker " + worker_id + " for job " + worker.job_id + " too";
  }
  worker.id = worker_id;
  worker.job_id = record.job.id();
  worker.attempt = record.job.attempt();
  worker.restored = true;
  worker.last_seen = now;
  return "";
}

// ---------------------------------------------------------------------------------------------
// Transitions.

grpc::Status JobLifecycle::commit_locked(ActiveJob& active, JobRecord updated,
                                         const std::string& reason,
                                         std::vector<v1::JobEvent> extra) {
  const v1::JobState before = active.record.job.state();
  const v1::JobState after = updated.job.state();
  std::vector<v1::JobEvent> events;
  if (before != after) events.push_back(state_change_event(after, reason));
  for (v1::JobEvent& event : extra) events.push_back(std::move(event));
  try {
    state_.store.update_job(updated, events);
  } catch (const StoreError& error) {
    return internal_error("cannot record job " + updated.job.id() + " as " + state_name(after),
                          error);
  }
  state_.metrics.count_events(static_cast<int64_t>(events.size()));
  after_commit_locked(active, std::move(updated), before, reason);
  return grpc::Status::OK;
}

void JobLifecycle::after_commit_locked(ActiveJob& active, JobRecord updated, v1::JobState before,
                                       const std::string& reason) {
  const v1::JobState after = updated.job.state();
  const std::string job_id = updated.job.id();
  if (before != after) {
    state_.metrics.add_jobs(before, -1);
    state_.metrics.add_jobs(after, +1);
    log_line("job " + job_id + ": " + state_name(before) + " -> " + state_name(after) +
             (reason.empty() ? "" : " (" + reason + ")"));
  }
  if (before == v1::JOB_STATE_QUEUED && after != v1::JOB_STATE_QUEUED) {
    state_.scheduler.remove_job(job_id);
  }
  if (is_terminal(after)) {
    const std::string worker_id = updated.job.worker_id();
    state_.active.erase(job_id);  // `active` is gone from here on
    state_.metrics.remove_job(job_id);
    state_.checkpoints.discard_job(job_id);
    const auto worker = state_.workers.find(worker_id);
    if (worker != state_.workers.end() && worker->second.job_id == job_id) {
      state_.release_worker_locked(worker->second);
    }
  } else {
    active.record = std::move(updated);
  }
  state_.hub.publish(job_id);
}

void JobLifecycle::end_orphaned_job_locked(Worker& worker, const std::string& reason) {
  const auto it = state_.active.find(worker.job_id);
  if (it == state_.active.end() || it->second.record.job.worker_id() != worker.id ||
      it->second.record.job.attempt() != worker.attempt) {
    worker.job_id.clear();
    return;
  }
  JobRecord updated = it->second.record;
  std::string why = reason;
  if (updated.cancel_requested) {
    updated.job.set_state(v1::JOB_STATE_CANCELLED);
    why = "cancelled by request; the worker did not confirm: " + reason;
  } else {
    updated.job.set_state(v1::JOB_STATE_FAILED);
    updated.job.set_failure_reason(reason);
  }
  *updated.job.mutable_end_time() = now_timestamp();
  // On a store error the worker keeps the job and the next scan tries again.
  (void)commit_locked(it->second, std::move(updated), why);
}

void JobLifecycle::dispatch_locked() {
  while (!state_.shutting_down) {
    const std::optional<Placement> placement = state_.scheduler.next();
    if (!placement) return;
    const auto job = state_.active.find(placement->job_id);
    const auto worker = state_.workers.find(placement->worker_id);
    if (job == state_.active.end() || worker == state_.workers.end() ||
        worker->second.connection == nullptr) {
      // Bookkeeping out of step: put back whichever side still exists.
      log_line("error: scheduler placed job " + placement->job_id + " on worker " +
               placement->worker_id + ", which " +
               (job == state_.active.end() ? "is not an active job" : "is not connected"));
      if (job != state_.active.end()) {
        state_.scheduler.add_job(job->first, job->second.record.job.priority(),
                                 job->second.record.submit_order, job->second.device);
      }
      continue;
    }
    if (!assign_locked(job->second, worker->second)) return;
  }
}

bool JobLifecycle::assign_locked(ActiveJob& job, Worker& worker) {
  JobRecord updated = job.record;
  updated.job.set_state(v1::JOB_STATE_ASSIGNED);
  updated.job.set_attempt(updated.job.attempt() + 1);
  updated.job.set_worker_id(worker.id);
  updated.job.clear_failure_reason();
  const v1::Job assigned = updated.job;
  const grpc::Status status =
      commit_locked(job, std::move(updated),
                    "assigned to worker " + worker.id + " (" + device_text(worker.device) +
                        "), attempt " + std::to_string(assigned.attempt()));
  if (!status.ok()) {
    // The store is failing: leave both where they were and try again on the next event.
    state_.scheduler.add_job(assigned.id(), assigned.priority(), job.record.submit_order,
                             job.device);
    state_.scheduler.add_idle_worker(worker.id, worker.device.kind());
    return false;
  }
  worker.job_id = assigned.id();
  worker.attempt = assigned.attempt();
  worker.assigned_on = worker.connection->id();
  worker.confirmed_on = worker.cancel_sent_on = 0;
  worker.restored = false;
  const int64_t queued_us = TimeUtil::TimestampToMicroseconds(assigned.create_time());
  const int64_t now_us = TimeUtil::TimestampToMicroseconds(now_timestamp());
  state_.metrics.observe_scheduling_latency(static_cast<double>(now_us - queued_us) * 1e-6);
  v1::CoordinatorMessage message;
  v1::Assignment* assignment = message.mutable_assignment();
  assignment->set_job_id(assigned.id());
  assignment->set_attempt(assigned.attempt());
  *assignment->mutable_spec() = assigned.spec();
  assignment->set_canonical_spec(assigned.canonical_spec());
  // A failed send means the stream is closing; the worker then misses its heartbeats (or
  // reconnects without the job) and the job fails with that reason.
  worker.connection->send(message);
  return true;
}

// ---------------------------------------------------------------------------------------------
// SubmitJob and CancelJob.

grpc::Status JobLifecycle::submit(const v1::SubmitJobRequest& request,
                                  v1::SubmitJobResponse* response) {
  if (!request.has_spec() && request.spec_text().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "spec: required (the job spec as a JSON object, or as spec_text)");
  }
  SubmittedSpec submitted;
  if (grpc::Status status = read_spec(request, &submitted); !status.ok()) return status;
  const JobSpec& spec = submitted.spec;
  if (spec.resources.world_size > 1) {
    // The spec is valid (lomo-worker train --nproc runs it on one host), but a worker runs one
    // rank: such a job would wait forever for a gang the scheduler cannot form.
    const std::string n = std::to_string(spec.resources.world_size);
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "invalid job spec: resources.world_size: " + n +
                            " needs a gang of workers, which the coordinator cannot schedule yet; "
                            "run it on one host with lomo-worker train JOB.yaml --nproc " +
                            n);
  }

  std::lock_guard lock(state_.mu);
  if (state_.shutting_down) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
  }
  JobRecord record;
  v1::Job& job = record.job;
  job.set_name(spec.name);
  job.set_state(v1::JOB_STATE_QUEUED);
  job.set_priority(spec.priority);
  set_job_spec(submitted, &job);
  *job.mutable_create_time() = now_timestamp();
  job.mutable_progress();  // present from the start, as the store returns it
  std::vector<v1::JobEvent> events{state_change_event(v1::JOB_STATE_QUEUED, "submitted")};
  if (grpc::Status status = insert_new_job_locked(record, events); !status.ok()) return status;
  state_.metrics.count_submission();
  state_.metrics.count_events(static_cast<int64_t>(events.size()));
  state_.metrics.add_jobs(v1::JOB_STATE_QUEUED, +1);
  ActiveJob& active = state_.active[job.id()];
  active.record = record;
  active.device = device_kind(spec.resources.device);
  state_.scheduler.add_job(job.id(), job.priority(), record.submit_order, active.device);
  log_line("job " + job.id() + ": submitted" + (job.name().empty() ? "" : " (" + job.name() + ")") +
           ", priority " + std::to_string(job.priority()) + ", device " + spec.resources.device);
  const std::string id = job.id();
  dispatch_locked();
  const auto now = state_.active.find(id);
  *response->mutable_job() = now != state_.active.end() ? now->second.record.job : record.job;
  return grpc::Status::OK;
}

grpc::Status JobLifecycle::insert_new_job_locked(JobRecord& record,
                                                 std::vector<v1::JobEvent>& events) {
  for (int tries = 0;; ++tries) {
    record.job.set_id(state_.new_id_locked("job-"));
    try {
      state_.store.insert_job(record, events);
      return grpc::Status::OK;
    } catch (const StoreError& error) {
      // 48 random bits make a collision rare; a second one means the store is the problem.
      bool taken = false;
      try {
        taken = state_.store.get_job(record.job.id()).has_value();
      } catch (const StoreError&) {
      }
      if (!taken || tries == 2) return internal_error("cannot store the job", error);
    }
  }
}

grpc::Status JobLifecycle::cancel(const v1::CancelJobRequest& request,
                                  v1::CancelJobResponse* response) {
  if (grpc::Status status = require_job_id(request.job_id()); !status.ok()) return status;
  std::lock_guard lock(state_.mu);
  const auto it = state_.active.find(request.job_id());
  if (it == state_.active.end()) return cancel_inactive(request.job_id(), response);
  ActiveJob& active = it->second;
  if (active.record.job.state() == v1::JOB_STATE_QUEUED) {
    JobRecord updated = active.record;
    updated.job.set_state(v1::JOB_STATE_CANCELLED);
    *updated.job.mutable_end_time() = now_timestamp();
    const v1::Job result = updated.job;
    if (grpc::Status status =
            commit_locked(active, std::move(updated), "cancelled by request before it started");
        !status.ok()) {
      return status;
    }
    *response->mutable_job() = result;
    return grpc::Status::OK;
  }
  // Assigned or running: the worker stops it and confirms with a CANCELLED status.
  if (!active.record.cancel_requested) {
    if (grpc::Status status = request_cancel_locked(active); !status.ok()) return status;
  }
  *response->mutable_job() = state_.active.at(request.job_id()).record.job;
  return grpc::Status::OK;
}

grpc::Status JobLifecycle::cancel_inactive(const std::string& job_id,
                                           v1::CancelJobResponse* response) {
  std::optional<JobRecord> record;
  try {
    record = state_.store.get_job(job_id);
  } catch (const StoreError& error) {
    return internal_error("cannot read job " + job_id, error);
  }
  if (!record) return job_not_found(job_id);
  if (record->job.state() != v1::JOB_STATE_CANCELLED) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "job " + job_id + " has already ended: " + state_name(record->job.state()));
  }
  *response->mutable_job() = std::move(record->job);  // cancelling twice is not an error
  return grpc::Status::OK;
}

grpc::Status JobLifecycle::request_cancel_locked(ActiveJob& active) {
  JobRecord updated = active.record;
  updated.cancel_requested = true;
  const std::string job_id = updated.job.id();
  const std::string worker_id = updated.job.worker_id();
  if (grpc::Status status = commit_locked(
          active, std::move(updated), "",
          {log_event("cancellation requested; waiting for worker " + worker_id + " to stop")});
      !status.ok()) {
    return status;
  }
  log_line("job " + job_id + ": cancellation requested, telling worker " + worker_id);
  const auto worker = state_.workers.find(worker_id);
  if (worker != state_.workers.end() && worker->second.job_id == job_id) {
    state_.send_cancel_locked(worker->second);
  }
  return grpc::Status::OK;
}

}  // namespace lomo::server
