#include "server/worker_registry.h"

#include <vector>

#include "common/log.h"
#include "server/job_text.h"
#include "server/timestamps.h"

namespace lomo::server {

namespace {

constexpr size_t kMaxWorkerIdLength = 256;

grpc::Status check_register(const v1::Register& message) {
  const v1::DeviceKind kind = message.device().kind();
  if (kind != v1::DEVICE_KIND_CPU && kind != v1::DEVICE_KIND_CUDA) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "register.device.kind: must be DEVICE_KIND_CPU or DEVICE_KIND_CUDA");
  }
  if (message.worker_id().size() > kMaxWorkerIdLength) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "register.worker_id: longer than 256 bytes");
  }
  return grpc::Status::OK;
}

// What a worker's events change: the events to store (states and checkpoints are the
// coordinator's to record, so the worker's own are dropped), and the job's progress. In a gang,
// only rank 0's metrics and evaluations count (they are global; the other ranks' are dropped) and
// every log line says which rank wrote it (`prefix`).
struct ReportedEvents {
  std::vector<v1::JobEvent> events;
  v1::JobProgress progress;
  bool progress_changed = false;
  const v1::TrainingMetrics* latest = nullptr;  // points into the message
};

ReportedEvents read_reported_events(const v1::JobEvents& message, v1::JobProgress progress,
                                    const std::string& prefix, bool keep_progress) {
  ReportedEvents reported;
  reported.progress = std::move(progress);
  reported.events.reserve(message.events_size());
  for (const v1::JobEvent& event : message.events()) {
    if (event.kind_case() == v1::JobEvent::KIND_NOT_SET ||
        event.kind_case() == v1::JobEvent::kStateChange ||
        event.kind_case() == v1::JobEvent::kCheckpoint) {
      continue;
    }
    if ((event.has_metrics() || event.has_eval()) && !keep_progress) continue;
    if (event.has_metrics()) {
      const v1::TrainingMetrics& metrics = event.metrics();
      reported.progress.set_step(metrics.step());
      if (metrics.total_steps() > 0) reported.progress.set_total_steps(metrics.total_steps());
      reported.progress.set_loss(metrics.loss());
      reported.progress.set_learning_rate(metrics.learning_rate());
      reported.progress.set_tokens_per_second(metrics.tokens_per_second());
      reported.latest = &metrics;
      reported.progress_changed = true;
    } else if (event.has_eval()) {
      reported.progress.set_eval_loss(event.eval().loss());
      if (event.eval().has_accuracy()) {
        reported.progress.set_eval_accuracy(event.eval().accuracy());
      } else {
        reported.progress.clear_eval_accuracy();
      }
      reported.progress_changed = true;
    }
    reported.events.push_back(event);
    reported.events.back().clear_sequence();
    if (event.has_log() && !prefix.empty()) {
      reported.events.back().mutable_log()->set_text(prefix + event.log().text());
    }
  }
  return reported;
}

// "rank R (worker W)": how a gang's events and reasons name who reported.
std::string rank_text(int rank, const std::string& worker_id) {
  return "rank " + std::to_string(rank) + " (worker " + worker_id + ")";
}

// What a rank ending FAILED or CANCELLED says, for end_job_by_rank: "W: REASON" for a failure
// ("rank R (worker W): ..." in a gang; a single job's failure is the worker's reason as it is),
// "W stopped" or "W cancelled it" (without a cancel request) for a cancellation.
std::string end_text(const JobRecord& record, const std::string& who,
                     const v1::JobStatusUpdate& message) {
  const std::string& said = message.reason();
  if (message.state() == v1::JOB_STATE_CANCELLED) {
    return who + (record.cancel_requested ? " stopped" : " cancelled it") +
           (said.empty() ? "" : ": " + said);
  }
  if (record.job.assignments_size() > 1) {
    return who + ": " + (said.empty() ? "reported a failure" : said);
  }
  return said.empty() ? who + " reported a failure" : said;
}

}  // namespace

grpc::Status WorkerRegistry::on_register(const std::shared_ptr<WorkerConnection>& connection,
                                         const v1::Register& message) {
  if (grpc::Status status = check_register(message); !status.ok()) return status;
  std::lock_guard lock(state_.mu);
  if (state_.shutting_down) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
  }
  if (state_.connections.count(connection->id())) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "Register is the first message of a stream and comes once");
  }
  const std::string id =
      message.worker_id().empty() ? state_.new_id_locked("worker-") : message.worker_id();
  // Two live workers started with one id would take the stream from each other in turn: the
  // second is refused while the first still heartbeats (three intervals), and takes over only a
  // stream gone silent (its process died or the network dropped it).
  if (const auto same = state_.workers.find(id);
      same != state_.workers.end() && same->second.connection != nullptr &&
      Clock::now() - same->second.connection->last_heartbeat() <
          std::chrono::milliseconds(3 * state_.options.heartbeat_interval_ms)) {
    return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                        "worker " + id +
                            " is connected already on another stream, which is alive; start this "
                            "worker with another --worker-id");
  }
  Worker& worker = state_.workers[id];
  worker.id = id;
  if (worker.connection != nullptr) {
    log_line("worker " + id + " connected again; closing its previous stream");
    const std::shared_ptr<WorkerConnection> previous = worker.connection;
    state_.disconnect_locked(worker);
    previous->close(grpc::Status(grpc::StatusCode::ABORTED,
                                 "worker " + id + " connected again on another stream"));
  }
  worker.device = message.device();
  worker.connection = connection;
  worker.restored = false;
  state_.connections[connection->id()] = id;
  state_.metrics.add_workers_connected(worker.device.kind(), +1);
  log_line("worker " + id + " registered (" + device_text(worker.device) +
           (message.version().empty() ? "" : ", version " + message.version()) +
           (message.advertise_address().empty()
                ? ""
                : ", peers reach it at " + message.advertise_address()) +
           ")" + (worker.job_id.empty() ? "" : "; it owns job " + worker.job_id));

  v1::CoordinatorMessage reply;
  reply.mutable_registered()->set_worker_id(id);
  reply.mutable_registered()->set_heartbeat_interval_ms(state_.options.heartbeat_interval_ms);
  connection->send(reply);
  // Not idle yet, even without a job here: a worker may still be stopping a rank of a job that
  // ended while it was away (jobs that ended are not restored after a coordinator restart). Its
  // first heartbeat, sent as soon as it is registered, says whether it runs nothing.
  worker.unsettled = worker.job_id.empty();
  worker.idle_ticket = worker.unsettled ? state_.scheduler.idle_ticket() : 0;
  state_.scheduler.add_busy_worker(id, worker.device.kind());
  return grpc::Status::OK;
}

void WorkerRegistry::on_heartbeat(const std::shared_ptr<WorkerConnection>& connection,
                                  const v1::Heartbeat& message) {
  std::lock_guard lock(state_.mu);
  Worker* worker = state_.worker_for_locked(*connection);
  if (worker == nullptr) return;
  const uint64_t here = connection->id();
  const bool reports_own_job = !worker->job_id.empty() && message.job_id() == worker->job_id &&
                               message.attempt() == worker->attempt;
  const bool draining =
      !worker->job_id.empty() && state_.draining_locked(*worker, worker->job_id, worker->attempt);
  const bool settles = update_settled_locked(*worker, message, reports_own_job);
  if (reports_own_job) {
    worker->confirmed_on = here;
    // A rank of an ended gang job keeps being told to stop (once per stream).
    if (draining || state_.active.at(worker->job_id).record.cancel_requested) {
      state_.send_cancel_locked(*worker);
    }
  } else if (draining && worker->confirmed_on == here) {
    // A rank told to stop, which had confirmed it ran, now runs something else: it stopped.
    log_line("worker " + worker->id + " stopped job " + worker->job_id + " attempt " +
             std::to_string(worker->attempt) + ", which had ended; it is free");
    worker->freed_job_id = worker->job_id;
    worker->freed_attempt = worker->attempt;
    worker->freed_rank = worker->rank;
    state_.release_worker_locked(*worker);
    lifecycle_.dispatch_locked();
  } else if (!worker->job_id.empty() && worker->assigned_on != here &&
             worker->confirmed_on != here) {
    lose_unconfirmed_attempt_locked(*worker, message);
  }
  if (!message.job_id().empty() && !reports_own_job) {
    // An attempt this worker does not own (it failed or was cancelled while the worker was
    // away): tell the worker to stop it so that two attempts never train at once.
    log_line("worker " + worker->id + " reports job " + message.job_id() + " attempt " +
             std::to_string(message.attempt()) + ", which it does not own; it is stale");
    v1::CoordinatorMessage cancel;
    cancel.mutable_cancel()->set_job_id(message.job_id());
    cancel.mutable_cancel()->set_attempt(message.attempt());
    cancel.mutable_cancel()->set_stale(true);
    connection->send(cancel);
  }
  if (settles && worker->job_id.empty()) {
    // Idle since it registered (when it was unsettled from the start): workers rank by that.
    if (worker->idle_ticket != 0) {
      state_.scheduler.add_idle_worker(worker->id, worker->device.kind(), worker->idle_ticket);
    } else {
      state_.scheduler.add_idle_worker(worker->id, worker->device.kind());
    }
    lifecycle_.dispatch_locked();
  }
  worker->idle_ticket = 0;  // one use, right after Register
}

bool WorkerRegistry::update_settled_locked(Worker& worker, const v1::Heartbeat& message,
                                           bool reports_own_job) {
  const bool was_unsettled = worker.unsettled;
  // A draining worker (shutting down) takes no new job: it stays unsettled, so never idle.
  worker.unsettled = message.draining() || (!message.job_id().empty() && !reports_own_job);
  if (worker.unsettled && !was_unsettled && worker.job_id.empty()) {
    // It was idle but runs an attempt it does not own: no job until that one stops.
    state_.scheduler.add_busy_worker(worker.id, worker.device.kind());
  }
  return was_unsettled && !worker.unsettled;
}

void WorkerRegistry::lose_unconfirmed_attempt_locked(Worker& worker, const v1::Heartbeat& message) {
  // The attempt was given to an earlier stream (or before a coordinator restart) and the
  // worker, back on a new stream, says it runs something else: the attempt is lost.
  const std::string reported = message.job_id().empty() ? "no job"
                                                        : "job " + message.job_id() + " attempt " +
                                                              std::to_string(message.attempt());
  lifecycle_.end_orphaned_job_locked(
      worker, "worker " + worker.id + " reconnected without job " + worker.job_id + " attempt " +
                  std::to_string(worker.attempt) + " (it reports " + reported + ")");
  if (worker.job_id.empty()) lifecycle_.dispatch_locked();  // the worker is idle now
}

void WorkerRegistry::on_status(const std::shared_ptr<WorkerConnection>& connection,
                               const v1::JobStatusUpdate& message) {
  std::lock_guard lock(state_.mu);
  Worker* worker = state_.worker_for_locked(*connection);
  if (worker != nullptr && state_.draining_locked(*worker, message.job_id(), message.attempt())) {
    end_draining_rank_locked(*worker, message);
    return;
  }
  if (worker != nullptr && is_terminal(message.state()) && !worker->freed_job_id.empty() &&
      worker->freed_job_id == message.job_id() && worker->freed_attempt == message.attempt()) {
    // The rank's heartbeat freed the worker before its end arrived: the job still hears it.
    record_late_rank_end_locked(*worker, worker->freed_rank, message);
    worker->freed_job_id.clear();
    return;
  }
  const std::string problem =
      state_.ownership_problem_locked(worker, message.job_id(), message.attempt());
  if (!problem.empty()) {
    log_line("ignoring status " + state_name(message.state()) + " for job " + message.job_id() +
             ": " + problem);
    return;
  }
  worker->confirmed_on = connection->id();
  ActiveJob& active = state_.active.at(message.job_id());
  const int rank = active.rank_of(worker->id);
  // A worker shutting down takes no new job: never idle again on this stream.
  if (message.draining()) worker->unsettled = true;
  if (lifecycle_.hold_for_peer_locked(active, rank, rank_text(rank, worker->id), message)) {
    // This rank is done while the attempt waits for the peer it points at: its worker is free.
    state_.release_worker_locked(*worker);
    lifecycle_.dispatch_locked();
    return;
  }
  JobRecord updated = active.record;
  std::string reason;
  std::vector<v1::JobEvent> events;
  const bool applies = active.world_size == 1 ? apply_status(*worker, message, &updated, &reason)
                                              : apply_rank_status(active, rank, *worker, message,
                                                                  &updated, &reason, &events);
  if (!applies) return;
  if (static_cast<size_t>(rank) < updated.rank_states.size() &&
      !is_terminal(updated.rank_states[static_cast<size_t>(rank)])) {
    updated.rank_states[static_cast<size_t>(rank)] = message.state();
  }
  const bool job_ends = is_terminal(updated.job.state());
  const bool permanent = message.state() == v1::JOB_STATE_FAILED && message.permanent();
  const bool preempted = message.state() == v1::JOB_STATE_FAILED && message.preempted();
  if (!lifecycle_
           .commit_locked(active, std::move(updated), reason, std::move(events), permanent,
                          preempted)
           .ok()) {
    return;
  }
  if (!job_ends && is_terminal(message.state())) {
    // This rank is done while the others still run: its worker is free.
    state_.release_worker_locked(*worker);
  }
  lifecycle_.dispatch_locked();
}

void WorkerRegistry::end_draining_rank_locked(Worker& worker, const v1::JobStatusUpdate& message) {
  if (!is_terminal(message.state())) {
    state_.send_cancel_locked(worker);  // still running: it was told to stop (once per stream)
    return;
  }
  record_late_rank_end_locked(worker, worker.rank, message);
  state_.release_worker_locked(worker);
  lifecycle_.dispatch_locked();
}

void WorkerRegistry::record_late_rank_end_locked(const Worker& worker, int rank,
                                                 const v1::JobStatusUpdate& message) {
  std::string text =
      rank_text(rank, worker.id) + ": " + state_name(message.state()) + " after the job ended";
  if (!message.reason().empty()) text += ": " + message.reason();
  log_line("job " + message.job_id() + ": " + text + "; the worker is free");
  std::vector<v1::JobEvent> events{log_event(text)};
  try {
    state_.store.append_events(message.job_id(), events, nullptr);
    state_.metrics.count_events(1);
    state_.hub.publish(message.job_id());
  } catch (const StoreError& error) {
    internal_error("cannot record the end of a rank of job " + message.job_id(), error);
  }
}

bool WorkerRegistry::apply_status(const Worker& worker, const v1::JobStatusUpdate& message,
                                  JobRecord* updated, std::string* reason) const {
  switch (message.state()) {
    case v1::JOB_STATE_RUNNING:
      if (updated->job.state() == v1::JOB_STATE_RUNNING) return false;
      updated->job.set_state(v1::JOB_STATE_RUNNING);
      *updated->job.mutable_start_time() = now_timestamp();
      *reason = "running on worker " + worker.id;
      break;
    case v1::JOB_STATE_SUCCEEDED:
      updated->job.set_state(v1::JOB_STATE_SUCCEEDED);
      *reason = message.reason().empty() ? "finished on worker " + worker.id : message.reason();
      break;
    case v1::JOB_STATE_FAILED:
    case v1::JOB_STATE_CANCELLED:
      *reason = end_job_by_rank(*updated, message.state(),
                                end_text(*updated, "worker " + worker.id, message));
      break;
    default:
      log_line("ignoring status " + state_name(message.state()) + " for job " + message.job_id() +
               " from worker " + worker.id +
               ": workers report RUNNING, SUCCEEDED, FAILED or "
               "CANCELLED");
      return false;
  }
  if (is_terminal(updated->job.state())) *updated->job.mutable_end_time() = now_timestamp();
  return true;
}

bool WorkerRegistry::apply_rank_status(const ActiveJob& active, int rank, const Worker& worker,
                                       const v1::JobStatusUpdate& message, JobRecord* updated,
                                       std::string* reason,
                                       std::vector<v1::JobEvent>* events) const {
  const std::string who = rank_text(rank, worker.id);
  const std::string said = message.reason().empty() ? "" : ": " + message.reason();
  switch (message.state()) {
    case v1::JOB_STATE_RUNNING:
      if (updated->job.state() == v1::JOB_STATE_ASSIGNED) {
        updated->job.set_state(v1::JOB_STATE_RUNNING);
        *updated->job.mutable_start_time() = now_timestamp();
        *reason = "running: " + who + " started first";
      } else {
        events->push_back(log_event(who + ": running"));
      }
      break;
    case v1::JOB_STATE_SUCCEEDED: {
      bool all = true;
      const std::vector<v1::JobState>& states = active.record.rank_states;
      for (size_t r = 0; r < states.size(); ++r) {
        if (static_cast<int>(r) != rank && states[r] != v1::JOB_STATE_SUCCEEDED) {
          all = false;
        }
      }
      if (all) {
        updated->job.set_state(v1::JOB_STATE_SUCCEEDED);
        *reason =
            "every rank (" + std::to_string(active.world_size) + ") finished; last " + who + said;
      } else {
        events->push_back(log_event(who + ": finished" + said));
      }
      break;
    }
    case v1::JOB_STATE_FAILED:
    case v1::JOB_STATE_CANCELLED:
      *reason = end_job_by_rank(*updated, message.state(), end_text(*updated, who, message));
      break;
    default:
      log_line("ignoring status " + state_name(message.state()) + " for job " + message.job_id() +
               " from " + who + ": workers report RUNNING, SUCCEEDED, FAILED or CANCELLED");
      return false;
  }
  if (is_terminal(updated->job.state())) *updated->job.mutable_end_time() = now_timestamp();
  return true;
}

void WorkerRegistry::on_events(const std::shared_ptr<WorkerConnection>& connection,
                               const v1::JobEvents& message) {
  std::lock_guard lock(state_.mu);
  Worker* worker = state_.worker_for_locked(*connection);
  const std::string problem =
      state_.ownership_problem_locked(worker, message.job_id(), message.attempt());
  if (!problem.empty()) {
    log_line("ignoring " + std::to_string(message.events_size()) + " events for job " +
             message.job_id() + ": " + problem);
    return;
  }
  ActiveJob& active = state_.active.at(message.job_id());
  const int rank = active.rank_of(worker->id);
  ReportedEvents reported = read_reported_events(
      message, active.record.job.progress(),
      active.world_size > 1 ? rank_text(rank, worker->id) + ": " : "", rank == 0);
  if (reported.events.empty()) return;
  try {
    state_.store.append_events(message.job_id(), reported.events,
                               reported.progress_changed ? &reported.progress : nullptr);
  } catch (const StoreError& error) {
    internal_error("cannot record events of job " + message.job_id(), error);
    return;
  }
  state_.metrics.count_events(static_cast<int64_t>(reported.events.size()));
  *active.record.job.mutable_progress() = reported.progress;
  if (reported.latest != nullptr)
    state_.metrics.set_job_progress(message.job_id(), *reported.latest);
  state_.hub.publish(message.job_id());
}

grpc::Status WorkerRegistry::check_fetch(const v1::FetchCheckpointRequest& request) {
  std::lock_guard lock(state_.mu);
  const auto worker = state_.workers.find(request.worker_id());
  std::string problem;
  if (worker == state_.workers.end() || worker->second.connection == nullptr) {
    problem = "worker " + request.worker_id() + " is not connected";
  } else {
    problem = state_.ownership_problem_locked(&worker->second, request.job_id(), request.attempt());
  }
  if (problem.empty()) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                      "a worker fetches checkpoints only of the job attempt it owns: " + problem);
}

grpc::Status WorkerRegistry::rendezvous_problem_locked(const std::string& worker_id,
                                                       const std::string& job_id,
                                                       int64_t attempt) const {
  const std::string what =
      "the rendezvous of job " + job_id + " attempt " + std::to_string(attempt);
  const auto worker = state_.workers.find(worker_id);
  if (worker != state_.workers.end() && worker->second.connection == nullptr &&
      worker->second.job_id == job_id && worker->second.attempt == attempt) {
    // Its daemon is reconnecting (after a coordinator restart or a network blip): the rank may
    // retry, as it does for an unreachable coordinator.
    return grpc::Status(
        grpc::StatusCode::UNAVAILABLE,
        what + ": worker " + worker_id + " runs one of its ranks but is not connected right now");
  }
  if (worker == state_.workers.end() || worker->second.connection == nullptr) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        what + " is open only to its ranks' connected workers; worker " +
                            worker_id + " is not connected");
  }
  const auto job = state_.active.find(job_id);
  if (job == state_.active.end() || job->second.record.job.attempt() > attempt) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        what + " is closed: the attempt has ended (worker " + worker_id + ")");
  }
  const std::string problem = state_.ownership_problem_locked(&worker->second, job_id, attempt);
  if (!problem.empty()) {
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        what + " is open only to the workers of its ranks: " + problem);
  }
  return grpc::Status::OK;
}

grpc::Status WorkerRegistry::rendezvous_set(const v1::RendezvousSetRequest& request) {
  std::lock_guard lock(state_.mu);
  if (grpc::Status status =
          rendezvous_problem_locked(request.worker_id(), request.job_id(), request.attempt());
      !status.ok()) {
    return status;
  }
  return state_.rendezvous.set(request.job_id(), request.attempt(), request.key(), request.value());
}

grpc::Status WorkerRegistry::rendezvous_get(const v1::RendezvousGetRequest& request,
                                            v1::RendezvousGetResponse* response) {
  std::lock_guard lock(state_.mu);
  if (grpc::Status status =
          rendezvous_problem_locked(request.worker_id(), request.job_id(), request.attempt());
      !status.ok()) {
    return status;
  }
  bool ready = false;
  std::vector<std::string> values;
  const std::vector<std::string> keys(request.keys().begin(), request.keys().end());
  grpc::Status status =
      state_.rendezvous.get(request.job_id(), request.attempt(), keys, &ready, &values);
  if (!status.ok()) return status;
  response->set_ready(ready);
  for (std::string& value : values) response->add_values(std::move(value));
  return grpc::Status::OK;
}

void WorkerRegistry::on_disconnect(const std::shared_ptr<WorkerConnection>& connection) {
  state_.checkpoints.discard_owner(connection->id());
  std::lock_guard lock(state_.mu);
  Worker* worker = state_.worker_for_locked(*connection);
  if (worker == nullptr) {
    state_.connections.erase(connection->id());
    return;
  }
  state_.disconnect_locked(*worker);
  log_line("worker " + worker->id + " disconnected" +
           (worker->job_id.empty() ? "" : "; job " + worker->job_id + " waits for it to return"));
  if (worker->job_id.empty()) state_.workers.erase(worker->id);
}

void WorkerRegistry::check_heartbeats() {
  std::lock_guard lock(state_.mu);
  if (state_.shutting_down) return;
  const Clock::time_point now = Clock::now();
  std::vector<std::string> gone;
  bool freed = false;
  for (auto& [id, worker] : state_.workers) {
    const Clock::time_point last = std::max(
        worker.connection != nullptr ? worker.connection->last_heartbeat() : worker.last_seen,
        silence_counted_from_);
    const double silent = std::chrono::duration<double>(now - last).count();
    if (silent <= allowed_silence_locked(worker)) continue;
    if (expire_worker_locked(worker, silent)) freed = true;
    if (worker.job_id.empty()) gone.push_back(id);
  }
  for (const std::string& id : gone) state_.workers.erase(id);
  if (freed) lifecycle_.dispatch_locked();
}

void WorkerRegistry::grant_grace(Clock::time_point woke) {
  std::lock_guard lock(state_.mu);
  silence_counted_from_ = std::max(silence_counted_from_, woke);
}

double WorkerRegistry::allowed_silence_locked(const Worker& worker) const {
  const double timeout = state_.options.heartbeat_timeout_seconds;
  // A worker without a stream may be in its reconnect backoff (common/reconnect.h).
  if (worker.connection == nullptr)
    return std::max(timeout, state_.options.reattach_window_seconds);
  return timeout;
}

bool WorkerRegistry::expire_worker_locked(Worker& worker, double silent) {
  const double timeout = allowed_silence_locked(worker);
  const std::string& id = worker.id;
  if (worker.connection != nullptr || !worker.job_id.empty()) {
    state_.metrics.count_heartbeat_timeout();
  }
  if (!worker.job_id.empty()) {
    const std::string reason =
        worker.restored
            ? "coordinator restarted and worker " + id +
                  " did not reconnect within the re-attach window (" + seconds_text(timeout) + " s)"
            : "worker " + id + " missed heartbeats for " + seconds_text(silent) +
                  (worker.connection == nullptr ? " s (disconnected; re-attach window "
                                                : " s (timeout ") +
                  seconds_text(timeout) + " s)";
    lifecycle_.end_orphaned_job_locked(worker, reason);
  }
  if (worker.connection == nullptr) return false;
  log_line("worker " + id + " missed heartbeats for " + seconds_text(silent) +
           " s; closing its stream");
  const std::shared_ptr<WorkerConnection> connection = worker.connection;
  state_.disconnect_locked(worker);
  connection->close(grpc::Status(
      grpc::StatusCode::UNAVAILABLE,
      "no heartbeat for " + seconds_text(silent) + " s (timeout " + seconds_text(timeout) + " s)"));
  return true;
}

void WorkerRegistry::close_streams_locked() {
  for (auto& [id, worker] : state_.workers) {
    if (worker.connection != nullptr) {
      worker.connection->close(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                            "the coordinator is shutting down; reconnect later"));
    }
  }
}

}  // namespace lomo::server
