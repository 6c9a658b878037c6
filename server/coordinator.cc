#include "server/coordinator.h"

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <cstdio>
#include <regex>
#include <set>

#include "server/log.h"
#include "server/timestamps.h"
#include "jobspec/job_spec.h"

namespace lomo::server {

namespace {

using google::protobuf::util::TimeUtil;

constexpr int kDefaultPageSize = 50;
constexpr int kMaxPageSize = 1000;
constexpr size_t kMaxWorkerIdLength = 256;

std::string state_name(v1::JobState state) {
  std::string name = v1::JobState_Name(state);
  const std::string prefix = "JOB_STATE_";
  return name.rfind(prefix, 0) == 0 ? name.substr(prefix.size()) : name;
}

std::string seconds_text(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f", seconds);
  return text;
}

v1::DeviceKind device_kind(const std::string& device) {
  if (device == "cpu") return v1::DEVICE_KIND_CPU;
  if (device == "cuda") return v1::DEVICE_KIND_CUDA;
  return v1::DEVICE_KIND_UNSPECIFIED;
}

std::string device_text(const v1::DeviceInfo& device) {
  std::string kind = v1::DeviceKind_Name(device.kind());
  const std::string prefix = "DEVICE_KIND_";
  if (kind.rfind(prefix, 0) == 0) kind = kind.substr(prefix.size());
  std::transform(kind.begin(), kind.end(), kind.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return device.name().empty() ? kind : kind + " " + device.name();
}

// The spec travels as a google.protobuf.Struct; its JSON is the job YAML schema. Returns the
// parsed spec, or INVALID_ARGUMENT naming the field ("optimizer.lr: must be > 0, got -1").
grpc::Status parse_spec(const google::protobuf::Struct& spec, JobSpec* parsed) {
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(spec, &json);
  if (!status.ok()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "spec: cannot read as JSON: " + std::string(status.message()));
  }
  const std::string source = "spec";
  try {
    *parsed = parse_job_spec(json, source);
  } catch (const JobSpecError& error) {
    // The JSON is generated on one line, so the parser's "(line 1)" says nothing; the source
    // name is replaced by a sentence.
    std::string message = error.what();
    if (message.rfind(source + ": ", 0) == 0) message = message.substr(source.size() + 2);
    static const std::regex kLineSuffix(R"( \(line \d+\)$)");
    message = std::regex_replace(message, kLineSuffix, "");
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "invalid job spec: " + message);
  }
  return grpc::Status::OK;
}

grpc::Status internal_error(const std::string& what, const std::exception& error) {
  log_line("error: " + what + ": " + error.what());
  return grpc::Status(grpc::StatusCode::INTERNAL, what + ": " + error.what());
}

grpc::Status require_job_id(const std::string& job_id) {
  if (job_id.empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "job_id: required");
  }
  return grpc::Status::OK;
}

grpc::Status job_not_found(const std::string& job_id) {
  return grpc::Status(grpc::StatusCode::NOT_FOUND, "job " + job_id + " not found");
}

v1::JobEvent state_change_event(v1::JobState state, const std::string& reason) {
  v1::JobEvent event;
  *event.mutable_time() = now_timestamp();
  event.mutable_state_change()->set_state(state);
  event.mutable_state_change()->set_reason(reason);
  return event;
}

v1::JobEvent log_event(const std::string& text) {
  v1::JobEvent event;
  *event.mutable_time() = now_timestamp();
  event.mutable_log()->set_text(text);
  return event;
}

}  // namespace

bool is_terminal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

Coordinator::Coordinator(CoordinatorOptions options, Store& store, CheckpointStore& checkpoints,
                         Metrics& metrics)
    : options_(options),
      store_(store),
      checkpoints_(checkpoints),
      metrics_(metrics),
      random_(std::random_device{}()) {}

Coordinator::~Coordinator() { stop(); }

void Coordinator::start() {
  for (const auto& [state, count] : store_.count_jobs_by_state()) metrics_.set_jobs(state, count);
  const std::vector<std::string> ids = store_.all_checkpoint_ids();
  const int removed = checkpoints_.recover(std::set<std::string>(ids.begin(), ids.end()));
  if (removed > 0) log_line("removed " + std::to_string(removed) + " uncommitted checkpoint dirs");

  std::lock_guard lock(mu_);
  const auto jobs =
      store_.jobs_in_states({v1::JOB_STATE_QUEUED, v1::JOB_STATE_ASSIGNED, v1::JOB_STATE_RUNNING});
  const Clock::time_point now = Clock::now();
  int queued = 0, waiting = 0;
  for (const JobRecord& record : jobs) {
    const std::string& id = record.job.id();
    ActiveJob& active = active_[id];
    active.record = record;
    JobSpec spec;
    std::string problem;
    if (const grpc::Status status = parse_spec(record.job.spec(), &spec); !status.ok()) {
      problem = "the stored spec is no longer valid: " + status.error_message();
    } else {
      active.device = device_kind(spec.resources.device);
    }
    if (problem.empty() && record.job.state() != v1::JOB_STATE_QUEUED &&
        record.job.worker_id().empty()) {
      problem = "the store names no worker for this " + state_name(record.job.state()) + " job";
    }
    if (problem.empty() && record.job.state() != v1::JOB_STATE_QUEUED) {
      Worker& worker = workers_[record.job.worker_id()];
      if (!worker.job_id.empty()) {
        problem = "the store names worker " + record.job.worker_id() + " for job " + worker.job_id +
                  " too";
      } else {
        worker.id = record.job.worker_id();
        worker.job_id = id;
        worker.attempt = record.job.attempt();
        worker.restored = true;
        worker.last_seen = now;
        ++waiting;
        continue;
      }
    }
    if (!problem.empty()) {
      JobRecord updated = record;
      updated.job.set_state(v1::JOB_STATE_FAILED);
      updated.job.set_failure_reason(problem);
      *updated.job.mutable_end_time() = now_timestamp();
      if (!commit_locked(active, updated, problem).ok()) active_.erase(id);
      continue;
    }
    scheduler_.add_job(id, record.job.priority(), record.submit_order, active.device);
    ++queued;
  }
  log_line("restored " + std::to_string(queued) + " queued jobs and " + std::to_string(waiting) +
           " jobs waiting for their workers to reconnect");
  store_.make_durable();
  sweeper_ = std::thread([this] { background_loop(); });
}

void Coordinator::begin_shutdown() {
  {
    std::lock_guard lock(mu_);
    if (shutting_down_) return;
    shutting_down_ = true;
    for (auto& [id, worker] : workers_) {
      if (worker.connection != nullptr) {
        worker.connection->close(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                              "the coordinator is shutting down; reconnect later"));
      }
    }
  }
  {
    std::lock_guard lock(sweeper_mu_);
    sweeper_stop_ = true;
    sweeper_wake_.notify_all();
  }
  hub_.close();
}

bool Coordinator::shutting_down() const {
  std::lock_guard lock(mu_);
  return shutting_down_;
}

void Coordinator::stop() {
  {
    std::lock_guard lock(sweeper_mu_);
    sweeper_stop_ = true;
    sweeper_wake_.notify_all();
  }
  if (sweeper_.joinable()) sweeper_.join();
}

void Coordinator::background_loop() {
  // Scanning ten times per timeout bounds the detection delay to 1.1 timeouts.
  const auto scan_period =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
          std::clamp(options_.heartbeat_timeout_seconds / 10, 0.02, 1.0)));
  const auto tick = std::min<Clock::duration>(scan_period, kDurabilityDelay);
  Clock::time_point next_scan = Clock::now() + scan_period;
  std::unique_lock lock(sweeper_mu_);
  while (!sweeper_stop_) {
    sweeper_wake_.wait_for(lock, tick, [this] { return sweeper_stop_; });
    if (sweeper_stop_) break;
    lock.unlock();
    if (Clock::now() >= next_scan) {
      check_heartbeats();
      next_scan = Clock::now() + scan_period;
    }
    // What workers reported (states, events) becomes durable within kDurabilityDelay without
    // making their streams wait for a disk sync; no sync when nothing was committed since.
    when_durable([](const grpc::Status&) {}, "recent job updates");
    lock.lock();
  }
}

std::string Coordinator::new_id_locked(const std::string& prefix) {
  char text[32];
  std::snprintf(text, sizeof(text), "%012llx",
                static_cast<unsigned long long>(random_() & 0xffffffffffffull));
  return prefix + text;
}

// ---------------------------------------------------------------------------------------------
// Transitions.

grpc::Status Coordinator::commit_locked(ActiveJob& active, JobRecord updated,
                                        const std::string& reason,
                                        std::vector<v1::JobEvent> extra) {
  const v1::JobState before = active.record.job.state();
  const v1::JobState after = updated.job.state();
  const std::string job_id = updated.job.id();
  std::vector<v1::JobEvent> events;
  if (before != after) events.push_back(state_change_event(after, reason));
  for (v1::JobEvent& event : extra) events.push_back(std::move(event));
  try {
    store_.update_job(updated, events);
  } catch (const StoreError& error) {
    return internal_error("cannot record job " + job_id + " as " + state_name(after), error);
  }
  metrics_.count_events(static_cast<int64_t>(events.size()));
  if (before != after) {
    metrics_.add_jobs(before, -1);
    metrics_.add_jobs(after, +1);
    log_line("job " + job_id + ": " + state_name(before) + " -> " + state_name(after) +
             (reason.empty() ? "" : " (" + reason + ")"));
  }
  if (before == v1::JOB_STATE_QUEUED && after != v1::JOB_STATE_QUEUED) {
    scheduler_.remove_job(job_id);
  }
  if (is_terminal(after)) {
    const std::string worker_id = updated.job.worker_id();
    active_.erase(job_id);
    metrics_.remove_job(job_id);
    checkpoints_.discard_job(job_id);
    const auto worker = workers_.find(worker_id);
    if (worker != workers_.end() && worker->second.job_id == job_id) {
      Worker& w = worker->second;
      w.job_id.clear();
      w.attempt = 0;
      w.assigned_on = w.confirmed_on = w.cancel_sent_on = 0;
      w.restored = false;
      if (w.connection != nullptr && !shutting_down_) {
        scheduler_.add_idle_worker(w.id, w.device.kind());
      }
    }
  } else {
    active.record = std::move(updated);
  }
  hub_.publish(job_id);
  return grpc::Status::OK;
}

void Coordinator::end_orphaned_job_locked(Worker& worker, const std::string& reason) {
  const auto it = active_.find(worker.job_id);
  if (it == active_.end() || it->second.record.job.worker_id() != worker.id ||
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

void Coordinator::dispatch_locked() {
  while (!shutting_down_) {
    const std::optional<Placement> placement = scheduler_.next();
    if (!placement) return;
    const auto job = active_.find(placement->job_id);
    const auto worker = workers_.find(placement->worker_id);
    if (job == active_.end() || worker == workers_.end() || worker->second.connection == nullptr) {
      // Bookkeeping out of step: put back whichever side still exists.
      log_line("error: scheduler placed job " + placement->job_id + " on worker " +
               placement->worker_id + ", which " +
               (job == active_.end() ? "is not an active job" : "is not connected"));
      if (job != active_.end()) {
        scheduler_.add_job(job->first, job->second.record.job.priority(),
                           job->second.record.submit_order, job->second.device);
      }
      continue;
    }
    Worker& w = worker->second;
    JobRecord updated = job->second.record;
    updated.job.set_state(v1::JOB_STATE_ASSIGNED);
    updated.job.set_attempt(updated.job.attempt() + 1);
    updated.job.set_worker_id(w.id);
    updated.job.clear_failure_reason();
    const v1::Job assigned = updated.job;
    const grpc::Status status =
        commit_locked(job->second, std::move(updated),
                      "assigned to worker " + w.id + " (" + device_text(w.device) + "), attempt " +
                          std::to_string(assigned.attempt()));
    if (!status.ok()) {
      // The store is failing: leave both where they were and try again on the next event.
      scheduler_.add_job(assigned.id(), assigned.priority(), job->second.record.submit_order,
                         job->second.device);
      scheduler_.add_idle_worker(w.id, w.device.kind());
      return;
    }
    w.job_id = assigned.id();
    w.attempt = assigned.attempt();
    w.assigned_on = w.connection->id();
    w.confirmed_on = w.cancel_sent_on = 0;
    w.restored = false;
    const int64_t queued_us = TimeUtil::TimestampToMicroseconds(assigned.create_time());
    const int64_t now_us = TimeUtil::TimestampToMicroseconds(now_timestamp());
    metrics_.observe_scheduling_latency(static_cast<double>(now_us - queued_us) * 1e-6);
    v1::CoordinatorMessage message;
    v1::Assignment* assignment = message.mutable_assignment();
    assignment->set_job_id(assigned.id());
    assignment->set_attempt(assigned.attempt());
    *assignment->mutable_spec() = assigned.spec();
    // A failed send means the stream is closing; the worker then misses its heartbeats (or
    // reconnects without the job) and the job fails with that reason.
    w.connection->send(message);
  }
}

Coordinator::Worker* Coordinator::worker_for_locked(const WorkerConnection& connection) {
  const auto id = connections_.find(connection.id());
  if (id == connections_.end()) return nullptr;
  const auto worker = workers_.find(id->second);
  if (worker == workers_.end() || worker->second.connection.get() != &connection) return nullptr;
  return &worker->second;
}

std::string Coordinator::ownership_problem_locked(const Worker* worker, const std::string& job_id,
                                                  int64_t attempt) {
  if (worker == nullptr) return "the stream is not registered (send Register first)";
  const auto it = active_.find(job_id);
  if (it == active_.end()) {
    return "job " + job_id + " is not active (unknown, or it has ended)";
  }
  const v1::Job& job = it->second.record.job;
  if (job.state() == v1::JOB_STATE_QUEUED || job.worker_id() != worker->id ||
      job.attempt() != attempt) {
    return "job " + job_id + " attempt " + std::to_string(attempt) + " is not assigned to worker " +
           worker->id + " (the job is " + state_name(job.state()) + ", attempt " +
           std::to_string(job.attempt()) +
           (job.worker_id().empty() ? "" : " on worker " + job.worker_id()) + ")";
  }
  return "";
}

void Coordinator::send_cancel_locked(Worker& worker) {
  if (worker.connection == nullptr || worker.job_id.empty()) return;
  if (worker.cancel_sent_on == worker.connection->id()) return;
  v1::CoordinatorMessage message;
  message.mutable_cancel()->set_job_id(worker.job_id);
  message.mutable_cancel()->set_attempt(worker.attempt);
  if (worker.connection->send(message)) worker.cancel_sent_on = worker.connection->id();
}

void Coordinator::disconnect_locked(Worker& worker) {
  if (worker.connection == nullptr) return;
  worker.last_seen = worker.connection->last_heartbeat();
  connections_.erase(worker.connection->id());
  metrics_.add_workers_connected(worker.device.kind(), -1);
  scheduler_.remove_worker(worker.id);
  worker.connection.reset();
}

// ---------------------------------------------------------------------------------------------
// JobService.

void Coordinator::submit_job(const v1::SubmitJobRequest& request, v1::SubmitJobResponse* response,
                             Done done) {
  const grpc::Status status = submit_job_committed(request, response);
  if (!status.ok()) return done(status);
  when_durable(std::move(done), "job " + response->job().id());
}

void Coordinator::cancel_job(const v1::CancelJobRequest& request, v1::CancelJobResponse* response,
                             Done done) {
  const grpc::Status status = cancel_job_committed(request, response);
  if (!status.ok()) return done(status);
  when_durable(std::move(done), "the cancellation of job " + request.job_id());
}

void Coordinator::when_durable(Done done, const std::string& what) {
  store_.when_durable([done = std::move(done), what](const std::string& error) {
    if (error.empty()) return done(grpc::Status::OK);
    log_line("error: " + what + " was recorded but cannot be made durable: " + error);
    done(grpc::Status(grpc::StatusCode::INTERNAL,
                      what + " was recorded but cannot be made durable: " + error));
  });
}

grpc::Status Coordinator::submit_job_committed(const v1::SubmitJobRequest& request,
                                               v1::SubmitJobResponse* response) {
  if (!request.has_spec()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "spec: required (the job spec as a JSON object)");
  }
  JobSpec spec;
  if (grpc::Status status = parse_spec(request.spec(), &spec); !status.ok()) return status;

  std::lock_guard lock(mu_);
  if (shutting_down_) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
  }
  JobRecord record;
  v1::Job& job = record.job;
  job.set_name(spec.name);
  job.set_state(v1::JOB_STATE_QUEUED);
  job.set_priority(spec.priority);
  *job.mutable_spec() = request.spec();
  *job.mutable_create_time() = now_timestamp();
  job.mutable_progress();  // present from the start, as the store returns it
  std::vector<v1::JobEvent> events{state_change_event(v1::JOB_STATE_QUEUED, "submitted")};
  for (int tries = 0;; ++tries) {
    job.set_id(new_id_locked("job-"));
    try {
      store_.insert_job(record, events);
      break;
    } catch (const StoreError& error) {
      // 48 random bits make a collision rare; a second one means the store is the problem.
      bool taken = false;
      try {
        taken = store_.get_job(job.id()).has_value();
      } catch (const StoreError&) {
      }
      if (!taken || tries == 2) return internal_error("cannot store the job", error);
    }
  }
  metrics_.count_submission();
  metrics_.count_events(static_cast<int64_t>(events.size()));
  metrics_.add_jobs(v1::JOB_STATE_QUEUED, +1);
  ActiveJob& active = active_[job.id()];
  active.record = record;
  active.device = device_kind(spec.resources.device);
  scheduler_.add_job(job.id(), job.priority(), record.submit_order, active.device);
  log_line("job " + job.id() + ": submitted" + (job.name().empty() ? "" : " (" + job.name() + ")") +
           ", priority " + std::to_string(job.priority()) + ", device " + spec.resources.device);
  const std::string id = job.id();
  dispatch_locked();
  const auto now = active_.find(id);
  *response->mutable_job() = now != active_.end() ? now->second.record.job : record.job;
  return grpc::Status::OK;
}

grpc::Status Coordinator::get_job(const v1::GetJobRequest& request, v1::GetJobResponse* response) {
  if (grpc::Status status = require_job_id(request.job_id()); !status.ok()) return status;
  try {
    std::optional<JobRecord> record = store_.get_job(request.job_id());
    if (!record) return job_not_found(request.job_id());
    *response->mutable_job() = std::move(record->job);
  } catch (const StoreError& error) {
    return internal_error("cannot read job " + request.job_id(), error);
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::list_jobs(const v1::ListJobsRequest& request,
                                    v1::ListJobsResponse* response) {
  if (request.page_size() < 0) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "page_size: must be >= 0, got " + std::to_string(request.page_size()));
  }
  const int page_size =
      request.page_size() == 0 ? kDefaultPageSize : std::min(request.page_size(), kMaxPageSize);
  std::vector<v1::JobState> states;
  for (int i = 0; i < request.states_size(); ++i) {
    const auto state = static_cast<v1::JobState>(request.states(i));
    if (state == v1::JOB_STATE_UNSPECIFIED || !v1::JobState_IsValid(state)) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "states[" + std::to_string(i) + "]: not a job state (" +
                              std::to_string(request.states(i)) + ")");
    }
    if (std::find(states.begin(), states.end(), state) == states.end()) states.push_back(state);
  }
  std::sort(states.begin(), states.end());
  try {
    JobPage page = store_.list_jobs(states, page_size, request.page_token());
    for (v1::Job& job : page.jobs) *response->add_jobs() = std::move(job);
    response->set_next_page_token(page.next_page_token);
  } catch (const std::invalid_argument& error) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, error.what());
  } catch (const StoreError& error) {
    return internal_error("cannot list jobs", error);
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::cancel_job_committed(const v1::CancelJobRequest& request,
                                               v1::CancelJobResponse* response) {
  if (grpc::Status status = require_job_id(request.job_id()); !status.ok()) return status;
  std::lock_guard lock(mu_);
  const auto it = active_.find(request.job_id());
  if (it == active_.end()) {
    std::optional<JobRecord> record;
    try {
      record = store_.get_job(request.job_id());
    } catch (const StoreError& error) {
      return internal_error("cannot read job " + request.job_id(), error);
    }
    if (!record) return job_not_found(request.job_id());
    if (record->job.state() != v1::JOB_STATE_CANCELLED) {
      return grpc::Status(
          grpc::StatusCode::FAILED_PRECONDITION,
          "job " + request.job_id() + " has already ended: " + state_name(record->job.state()));
    }
    *response->mutable_job() = std::move(record->job);  // cancelling twice is not an error
    return grpc::Status::OK;
  }
  ActiveJob& active = it->second;
  JobRecord updated = active.record;
  if (updated.job.state() == v1::JOB_STATE_QUEUED) {
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
  if (!updated.cancel_requested) {
    updated.cancel_requested = true;
    const std::string worker_id = updated.job.worker_id();
    if (grpc::Status status = commit_locked(
            active, std::move(updated), "",
            {log_event("cancellation requested; waiting for worker " + worker_id + " to stop")});
        !status.ok()) {
      return status;
    }
    log_line("job " + request.job_id() + ": cancellation requested, telling worker " + worker_id);
    const auto worker = workers_.find(worker_id);
    if (worker != workers_.end() && worker->second.job_id == request.job_id()) {
      send_cancel_locked(worker->second);
    }
  }
  *response->mutable_job() = active_.at(request.job_id()).record.job;
  return grpc::Status::OK;
}

grpc::Status Coordinator::list_checkpoints(const v1::ListCheckpointsRequest& request,
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

grpc::Status Coordinator::read_events(const std::string& job_id, int64_t after_sequence, int limit,
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
  } catch (const StoreError& error) {
    return internal_error("cannot read events of job " + job_id, error);
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::find_checkpoint(const std::string& checkpoint_id,
                                          v1::CheckpointInfo* info,
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

// ---------------------------------------------------------------------------------------------
// WorkerService.

grpc::Status Coordinator::on_register(const std::shared_ptr<WorkerConnection>& connection,
                                      const v1::Register& message) {
  const v1::DeviceKind kind = message.device().kind();
  if (kind != v1::DEVICE_KIND_CPU && kind != v1::DEVICE_KIND_CUDA) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "register.device.kind: must be DEVICE_KIND_CPU or DEVICE_KIND_CUDA");
  }
  if (message.worker_id().size() > kMaxWorkerIdLength) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "register.worker_id: longer than 256 bytes");
  }
  std::lock_guard lock(mu_);
  if (shutting_down_) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
  }
  if (connections_.count(connection->id())) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "Register is the first message of a stream and comes once");
  }
  const std::string id =
      message.worker_id().empty() ? new_id_locked("worker-") : message.worker_id();
  Worker& worker = workers_[id];
  worker.id = id;
  if (worker.connection != nullptr) {
    log_line("worker " + id + " connected again; closing its previous stream");
    const std::shared_ptr<WorkerConnection> previous = worker.connection;
    disconnect_locked(worker);
    previous->close(grpc::Status(grpc::StatusCode::ABORTED,
                                 "worker " + id + " connected again on another stream"));
  }
  worker.device = message.device();
  worker.connection = connection;
  worker.restored = false;
  connections_[connection->id()] = id;
  metrics_.add_workers_connected(kind, +1);
  log_line("worker " + id + " registered (" + device_text(worker.device) +
           (message.version().empty() ? "" : ", version " + message.version()) + ")" +
           (worker.job_id.empty() ? "" : "; it owns job " + worker.job_id));

  v1::CoordinatorMessage reply;
  reply.mutable_registered()->set_worker_id(id);
  reply.mutable_registered()->set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  connection->send(reply);
  if (worker.job_id.empty()) {
    scheduler_.add_idle_worker(id, kind);
    dispatch_locked();
  }
  return grpc::Status::OK;
}

void Coordinator::on_heartbeat(const std::shared_ptr<WorkerConnection>& connection,
                               const v1::Heartbeat& message) {
  std::lock_guard lock(mu_);
  Worker* worker = worker_for_locked(*connection);
  if (worker == nullptr) return;
  const uint64_t here = connection->id();
  const bool reports_own_job = !worker->job_id.empty() && message.job_id() == worker->job_id &&
                               message.attempt() == worker->attempt;
  if (reports_own_job) {
    worker->confirmed_on = here;
    const auto job = active_.find(worker->job_id);
    if (job != active_.end() && job->second.record.cancel_requested) send_cancel_locked(*worker);
  } else if (!worker->job_id.empty() && worker->assigned_on != here &&
             worker->confirmed_on != here) {
    // The attempt was given to an earlier stream (or before a coordinator restart) and the
    // worker, back on a new stream, says it runs something else: the attempt is lost.
    const std::string reported =
        message.job_id().empty()
            ? "no job"
            : "job " + message.job_id() + " attempt " + std::to_string(message.attempt());
    end_orphaned_job_locked(*worker, "worker " + worker->id + " reconnected without job " +
                                         worker->job_id + " attempt " +
                                         std::to_string(worker->attempt) + " (it reports " +
                                         reported + ")");
    if (worker->job_id.empty()) dispatch_locked();  // the worker is idle now
  }
  if (!message.job_id().empty() && !reports_own_job) {
    // An attempt this worker does not own (it failed or was cancelled while the worker was
    // away): tell the worker to stop it so that two attempts never train at once.
    log_line("worker " + worker->id + " reports job " + message.job_id() + " attempt " +
             std::to_string(message.attempt()) + ", which it does not own; cancelling it");
    v1::CoordinatorMessage cancel;
    cancel.mutable_cancel()->set_job_id(message.job_id());
    cancel.mutable_cancel()->set_attempt(message.attempt());
    connection->send(cancel);
  }
}

void Coordinator::on_status(const std::shared_ptr<WorkerConnection>& connection,
                            const v1::JobStatusUpdate& message) {
  std::lock_guard lock(mu_);
  Worker* worker = worker_for_locked(*connection);
  const std::string problem = ownership_problem_locked(worker, message.job_id(), message.attempt());
  if (!problem.empty()) {
    log_line("ignoring status " + state_name(message.state()) + " for job " + message.job_id() +
             ": " + problem);
    return;
  }
  worker->confirmed_on = connection->id();
  ActiveJob& active = active_.at(message.job_id());
  JobRecord updated = active.record;
  const v1::JobState from = updated.job.state();
  std::string reason;
  switch (message.state()) {
    case v1::JOB_STATE_RUNNING:
      if (from == v1::JOB_STATE_RUNNING) return;
      updated.job.set_state(v1::JOB_STATE_RUNNING);
      *updated.job.mutable_start_time() = now_timestamp();
      reason = "running on worker " + worker->id;
      break;
    case v1::JOB_STATE_SUCCEEDED:
      updated.job.set_state(v1::JOB_STATE_SUCCEEDED);
      reason = message.reason().empty() ? "finished on worker " + worker->id : message.reason();
      break;
    case v1::JOB_STATE_FAILED:
      updated.job.set_state(v1::JOB_STATE_FAILED);
      reason = message.reason().empty() ? "worker " + worker->id + " reported a failure"
                                        : message.reason();
      updated.job.set_failure_reason(reason);
      break;
    case v1::JOB_STATE_CANCELLED:
      updated.job.set_state(v1::JOB_STATE_CANCELLED);
      reason = updated.cancel_requested ? "cancelled by request; worker " + worker->id + " stopped"
                                        : "worker " + worker->id + " cancelled it";
      if (!message.reason().empty()) reason += ": " + message.reason();
      break;
    default:
      log_line("ignoring status " + state_name(message.state()) + " for job " + message.job_id() +
               " from worker " + worker->id +
               ": workers report RUNNING, SUCCEEDED, FAILED or "
               "CANCELLED");
      return;
  }
  if (is_terminal(updated.job.state())) *updated.job.mutable_end_time() = now_timestamp();
  if (commit_locked(active, std::move(updated), reason).ok()) dispatch_locked();
}

void Coordinator::on_events(const std::shared_ptr<WorkerConnection>& connection,
                            const v1::JobEvents& message) {
  std::lock_guard lock(mu_);
  Worker* worker = worker_for_locked(*connection);
  const std::string problem = ownership_problem_locked(worker, message.job_id(), message.attempt());
  if (!problem.empty()) {
    log_line("ignoring " + std::to_string(message.events_size()) + " events for job " +
             message.job_id() + ": " + problem);
    return;
  }
  ActiveJob& active = active_.at(message.job_id());
  v1::JobProgress progress = active.record.job.progress();
  const v1::TrainingMetrics* latest = nullptr;
  bool progress_changed = false;
  std::vector<v1::JobEvent> events;
  events.reserve(message.events_size());
  for (const v1::JobEvent& event : message.events()) {
    // States and checkpoints are the coordinator's to record.
    if (event.kind_case() == v1::JobEvent::KIND_NOT_SET ||
        event.kind_case() == v1::JobEvent::kStateChange ||
        event.kind_case() == v1::JobEvent::kCheckpoint) {
      continue;
    }
    if (event.has_metrics()) {
      const v1::TrainingMetrics& metrics = event.metrics();
      progress.set_step(metrics.step());
      if (metrics.total_steps() > 0) progress.set_total_steps(metrics.total_steps());
      progress.set_loss(metrics.loss());
      progress.set_learning_rate(metrics.learning_rate());
      progress.set_tokens_per_second(metrics.tokens_per_second());
      latest = &metrics;
      progress_changed = true;
    } else if (event.has_eval()) {
      progress.set_eval_loss(event.eval().loss());
      progress_changed = true;
    }
    events.push_back(event);
    events.back().clear_sequence();
  }
  if (events.empty()) return;
  try {
    store_.append_events(message.job_id(), events, progress_changed ? &progress : nullptr);
  } catch (const StoreError& error) {
    internal_error("cannot record events of job " + message.job_id(), error);
    return;
  }
  metrics_.count_events(static_cast<int64_t>(events.size()));
  *active.record.job.mutable_progress() = progress;
  if (latest != nullptr) metrics_.set_job_progress(message.job_id(), *latest);
  hub_.publish(message.job_id());
}

void Coordinator::on_checkpoint_chunk(const std::shared_ptr<WorkerConnection>& connection,
                                      const v1::CheckpointChunk& chunk) {
  std::string rejection;
  {
    std::lock_guard lock(mu_);
    rejection =
        ownership_problem_locked(worker_for_locked(*connection), chunk.job_id(), chunk.attempt());
  }
  // File I/O happens without mu_: other jobs' transitions do not wait for a disk write.
  ChunkResult result = checkpoints_.receive(connection->id(), chunk, rejection);
  if (!result.commit) return;

  v1::CoordinatorMessage reply;
  v1::CheckpointAck* ack = reply.mutable_checkpoint_ack();
  ack->set_job_id(chunk.job_id());
  ack->set_step(chunk.step());
  std::string error = result.error;
  std::unique_lock lock(mu_);
  if (error.empty()) {
    const VerifiedUpload& upload = *result.verified;
    error =
        ownership_problem_locked(worker_for_locked(*connection), chunk.job_id(), chunk.attempt());
    if (!error.empty()) {
      std::error_code ignored;
      std::filesystem::remove_all(upload.temporary_dir, ignored);
    } else {
      error = checkpoints_.publish(upload);
    }
    if (error.empty()) {
      v1::JobEvent event;
      *event.mutable_time() = now_timestamp();
      v1::CheckpointInfo* info = event.mutable_checkpoint();
      *info = upload.info;
      *info->mutable_commit_time() = event.time();
      try {
        store_.insert_checkpoint(upload.job_id, *info, event);
      } catch (const StoreError& exception) {
        checkpoints_.unpublish(upload.job_id, upload.step);
        error = std::string("cannot record the checkpoint: ") + exception.what();
        log_line("error: " + error);
      }
    }
    if (error.empty()) {
      metrics_.count_events(1);
      metrics_.count_checkpoint(true, upload.info.size_bytes());
      log_line("job " + upload.job_id + ": checkpoint " + upload.info.checkpoint_id() +
               " committed (" + std::to_string(upload.info.files_size()) + " files, " +
               std::to_string(upload.info.size_bytes()) + " bytes)");
      hub_.publish(upload.job_id);
    }
  }
  if (!error.empty()) {
    metrics_.count_checkpoint(false, 0);
    log_line("job " + chunk.job_id() + ": checkpoint at step " + std::to_string(chunk.step()) +
             " rejected: " + error);
  }
  lock.unlock();
  if (!error.empty()) {
    ack->set_committed(false);
    ack->set_error(error);
    connection->send(reply);
    return;
  }
  // The worker may delete its copy once it has the ack: the record must survive a power cut.
  ack->set_committed(true);
  when_durable(
      [connection, reply](const grpc::Status& durable) mutable {
        if (!durable.ok()) {
          reply.mutable_checkpoint_ack()->set_committed(false);
          reply.mutable_checkpoint_ack()->set_error(durable.error_message());
        }
        connection->send(reply);
      },
      "checkpoint " + result.verified->info.checkpoint_id());
}

void Coordinator::on_disconnect(const std::shared_ptr<WorkerConnection>& connection) {
  checkpoints_.discard_owner(connection->id());
  std::lock_guard lock(mu_);
  Worker* worker = worker_for_locked(*connection);
  if (worker == nullptr) {
    connections_.erase(connection->id());
    return;
  }
  disconnect_locked(*worker);
  log_line("worker " + worker->id + " disconnected" +
           (worker->job_id.empty() ? "" : "; job " + worker->job_id + " waits for it to return"));
  if (worker->job_id.empty()) workers_.erase(worker->id);
}

void Coordinator::check_heartbeats() {
  std::lock_guard lock(mu_);
  if (shutting_down_) return;
  const Clock::time_point now = Clock::now();
  const double timeout = options_.heartbeat_timeout_seconds;
  std::vector<std::string> gone;
  bool freed = false;
  for (auto& [id, worker] : workers_) {
    const Clock::time_point last =
        worker.connection != nullptr ? worker.connection->last_heartbeat() : worker.last_seen;
    const double silent = std::chrono::duration<double>(now - last).count();
    if (silent <= timeout) continue;
    if (worker.connection != nullptr || !worker.job_id.empty()) metrics_.count_heartbeat_timeout();
    if (!worker.job_id.empty()) {
      const std::string reason =
          worker.restored ? "coordinator restarted and worker " + id +
                                " did not reconnect within the heartbeat timeout (" +
                                seconds_text(timeout) + " s)"
                          : "worker " + id + " missed heartbeats for " + seconds_text(silent) +
                                " s (timeout " + seconds_text(timeout) + " s)";
      end_orphaned_job_locked(worker, reason);
    }
    if (worker.connection != nullptr) {
      log_line("worker " + id + " missed heartbeats for " + seconds_text(silent) +
               " s; closing its stream");
      const std::shared_ptr<WorkerConnection> connection = worker.connection;
      disconnect_locked(worker);
      connection->close(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                     "no heartbeat for " + seconds_text(silent) + " s (timeout " +
                                         seconds_text(timeout) + " s)"));
      freed = true;
    }
    if (worker.job_id.empty()) gone.push_back(id);
  }
  for (const std::string& id : gone) workers_.erase(id);
  if (freed) dispatch_locked();
}

}  // namespace lomo::server
