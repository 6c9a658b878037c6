#include "server/job_lifecycle.h"

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <string_view>

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

bool is_attempt_running(v1::JobState state) {
  return state == v1::JOB_STATE_ASSIGNED || state == v1::JOB_STATE_RUNNING;
}

// The backoff before restart number `restart` (1-based): 1, 2, 4, ... s, at most 60 s, so that a
// cause that needs time to clear (a node rebooting, memory freed) gets it.
std::chrono::seconds restart_backoff(int64_t restart) {
  constexpr int64_t kMaxSeconds = 60;
  const int64_t shift = std::clamp<int64_t>(restart - 1, 0, 6);
  return std::chrono::seconds(std::min<int64_t>(int64_t{1} << shift, kMaxSeconds));
}

int64_t restarts_used(const v1::Job& job) {
  int64_t used = 0;
  for (const v1::JobAttempt& attempt : job.attempts()) used += attempt.restarted() ? 1 : 0;
  return used;
}

std::string restarts_text(int64_t restarts) {
  return std::to_string(restarts) + (restarts == 1 ? " restart" : " restarts");
}

// "attempt 2 failed on worker W: REASON" (a gang's reason names its rank and worker already).
std::string attempt_failure_text(const v1::Job& job, const std::string& what) {
  std::string text = "attempt " + std::to_string(job.attempt()) + " failed";
  if (job.assignments_size() == 1) text += " on worker " + job.assignments(0).worker_id();
  return text + ": " + what;
}

// "attempt 2 was preempted on worker W: REASON".
std::string attempt_preempted_text(const v1::Job& job, const std::string& what) {
  std::string text = "attempt " + std::to_string(job.attempt()) + " was preempted";
  if (job.assignments_size() == 1) text += " on worker " + job.assignments(0).worker_id();
  return text + ": " + what;
}

// The job goes back to the queue for a new attempt: nothing of the ended one stays current.
void clear_attempt(JobRecord& updated) {
  v1::Job& next = updated.job;
  next.set_state(v1::JOB_STATE_QUEUED);
  next.clear_end_time();
  next.clear_failure_reason();
  next.clear_worker_id();
  next.clear_assignments();
  updated.rank_states.clear();
}

// "worker W" for a job of its own, "rank R (worker W)" for each rank of a gang that `pending`
// holds, joined with commas.
std::string ranks_text(const ActiveJob& active, const std::vector<v1::JobState>& states,
                       bool (*pending)(v1::JobState)) {
  std::string text;
  for (const v1::RankAssignment& assignment : active.record.job.assignments()) {
    const size_t rank = static_cast<size_t>(assignment.rank());
    if (rank < states.size() && !pending(states[rank])) continue;
    text += text.empty() ? "" : ", ";
    text += active.world_size > 1
                ? "rank " + std::to_string(rank) + " (worker " + assignment.worker_id() + ")"
                : "worker " + assignment.worker_id();
  }
  return text;
}

bool not_running_yet(v1::JobState state) { return state == v1::JOB_STATE_UNSPECIFIED; }
bool not_ended(v1::JobState state) { return !is_terminal(state); }

// The record of the attempt `job` ran, which `next` (the job after this transition) ends.
v1::JobAttempt ended_attempt(const v1::Job& job, const v1::Job& next, const std::string& reason) {
  v1::JobAttempt entry;
  entry.set_attempt(job.attempt());
  entry.set_state(next.state());
  entry.set_reason(next.state() == v1::JOB_STATE_FAILED ? next.failure_reason() : reason);
  *entry.mutable_end_time() = next.has_end_time() ? next.end_time() : now_timestamp();
  entry.set_step(next.progress().step());
  *entry.mutable_assignments() = job.assignments();
  return entry;
}

// `reason` with each path into a daemon's attempt directory (".../jobs/JOB/attempt-N/out/...")
// written as "<attempt dir>/out/...": every attempt runs in a new directory, so a trainer error
// that names a file of its output differs from the same error of the attempt before only there.
std::string without_attempt_dirs(const std::string& reason) {
  static constexpr std::string_view kMarker = "/attempt-";
  std::string text;
  size_t copied = 0;
  for (size_t at = reason.find(kMarker); at != std::string::npos;
       at = reason.find(kMarker, at + 1)) {
    size_t end = at + kMarker.size();
    while (end < reason.size() && std::isdigit(static_cast<unsigned char>(reason[end]))) ++end;
    if (end == at + kMarker.size() ||
        (end < reason.size() && reason[end] != '/' && reason[end] != ':' && reason[end] != ' ')) {
      continue;  // "/attempt-" without a number, or a longer name: not an attempt directory
    }
    size_t start = at;  // back to the start of the path
    while (start > copied && reason[start - 1] != ' ' && reason[start - 1] != '\'' &&
           reason[start - 1] != '"' && reason[start - 1] != '(') {
      --start;
    }
    text.append(reason, copied, start - copied).append("<attempt dir>");
    copied = end;
  }
  return text.append(reason, copied);
}

// `reason` with every "(worker W)" written as "(worker)": a gang's attempts name their ranks'
// workers, and a restarted gang may run on other workers, while the same rank failing the same
// way at the same step is the same cause on any of them.
std::string without_worker_names(const std::string& reason) {
  static constexpr std::string_view kMarker = "(worker ";
  std::string text;
  size_t copied = 0;
  for (size_t at = reason.find(kMarker); at != std::string::npos;
       at = reason.find(kMarker, copied)) {
    const size_t close = reason.find(')', at);
    if (close == std::string::npos) break;
    text.append(reason, copied, at - copied).append("(worker)");
    copied = close + 1;
  }
  return text.append(reason, copied);
}

std::string comparable_reason(const std::string& reason) {
  return without_worker_names(without_attempt_dirs(reason));
}

// The attempt failed as the restarted one before it did (same reason, same step): a cause that
// a new attempt would meet a third time.
bool repeats(const v1::JobAttempt* previous, const v1::JobAttempt& entry) {
  return previous != nullptr && previous->restarted() &&
         previous->state() == v1::JOB_STATE_FAILED &&
         comparable_reason(previous->reason()) == comparable_reason(entry.reason()) &&
         previous->step() == entry.step();
}

std::string repeated_text(const v1::JobAttempt& previous, const v1::JobAttempt& entry,
                          int64_t used) {
  return " (failed the same way at step " + std::to_string(entry.step()) + " in attempts " +
         std::to_string(previous.attempt()) + " and " + std::to_string(entry.attempt()) +
         "; not restarted again" + (used > 0 ? ", after " + restarts_text(used) : "") + ")";
}

}  // namespace

std::string end_job_by_rank(JobRecord& updated, v1::JobState rank_end, const std::string& what) {
  *updated.job.mutable_end_time() = now_timestamp();
  if (updated.cancel_requested) {
    updated.job.set_state(v1::JOB_STATE_CANCELLED);
    return "cancelled by request; " + what;
  }
  updated.job.set_state(rank_end);
  if (rank_end == v1::JOB_STATE_FAILED) updated.job.set_failure_reason(what);
  return what;
}

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
    active.world_size = spec.resources.world_size;
    active.max_restarts = spec.resources.max_restarts;
    if (active.record.job.canonical_spec().empty()) {
      active.record.job.set_canonical_spec(job_spec_to_yaml(spec));
    }
  } catch (const JobSpecError& error) {
    problem = "the stored spec is no longer valid: " + spec_problems_for_api(error, false);
  }
  if (problem.empty() && record.job.state() != v1::JOB_STATE_QUEUED) {
    problem = wait_for_workers_locked(active, now);
    if (problem.empty()) return Restored::kWaitingForWorker;
  }
  if (!problem.empty()) {
    JobRecord updated = record;
    updated.job.set_state(v1::JOB_STATE_FAILED);
    updated.job.set_failure_reason(problem);
    *updated.job.mutable_end_time() = now_timestamp();
    // A stored job that cannot be read or placed would fail the same way on every restart.
    if (!commit_locked(active, updated, problem, {}, /*permanent_failure=*/true).ok()) {
      state_.active.erase(id);
    }
    return Restored::kFailed;
  }
  const int attempts = record.job.attempts_size();
  if (attempts > 0 && record.job.attempts(attempts - 1).restarted()) {
    // Queued to restart before the coordinator stopped: the backoff still runs out when it said.
    const int64_t left_us =
        TimeUtil::TimestampToMicroseconds(record.job.attempts(attempts - 1).restart_time()) -
        TimeUtil::TimestampToMicroseconds(now_timestamp());
    if (left_us > 0) {
      state_.restart_at[id] = now + std::chrono::microseconds(left_us);
      return Restored::kQueued;
    }
  }
  state_.scheduler.add_job(id, record.job.priority(), record.submit_order, active.device,
                           active.world_size);
  return Restored::kQueued;
}

std::string JobLifecycle::wait_for_workers_locked(ActiveJob& active, Clock::time_point now) {
  const v1::Job& job = active.record.job;
  if (job.worker_id().empty() || job.assignments_size() == 0) {
    return "the store names no worker for this " + state_name(job.state()) + " job";
  }
  if (job.assignments_size() != active.world_size) {
    return "the store names " + std::to_string(job.assignments_size()) +
           " workers for this job of world size " + std::to_string(active.world_size);
  }
  std::vector<v1::JobState>& states = active.record.rank_states;
  states.resize(static_cast<size_t>(active.world_size), v1::JOB_STATE_UNSPECIFIED);
  // A rank that had finished is not waited for: its worker was free before the restart.
  const auto waits_for = [&](const v1::RankAssignment& assignment) {
    return !is_terminal(states[static_cast<size_t>(assignment.rank())]);
  };
  // Every rank's worker must be free before any is taken: a job either waits for its whole gang
  // or fails.
  for (const v1::RankAssignment& assignment : job.assignments()) {
    if (assignment.rank() < 0 || assignment.rank() >= active.world_size) {
      return "the store names rank " + std::to_string(assignment.rank()) +
             " for this job of world size " + std::to_string(active.world_size);
    }
    if (!waits_for(assignment)) continue;
    const auto worker = state_.workers.find(assignment.worker_id());
    if (worker != state_.workers.end() && !worker->second.job_id.empty()) {
      return "the store names worker " + assignment.worker_id() + " for job " +
             worker->second.job_id + " too";
    }
  }
  for (const v1::RankAssignment& assignment : job.assignments()) {
    if (!waits_for(assignment)) continue;
    Worker& worker = state_.workers[assignment.worker_id()];
    worker.id = assignment.worker_id();
    worker.job_id = job.id();
    worker.attempt = job.attempt();
    worker.rank = assignment.rank();
    worker.restored = true;
    worker.last_seen = now;
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Transitions.

grpc::Status JobLifecycle::commit_locked(ActiveJob& active, JobRecord updated,
                                         const std::string& reason, std::vector<v1::JobEvent> extra,
                                         bool permanent_failure, bool preempted) {
  const v1::JobState before = active.record.job.state();
  std::string why = reason;
  std::optional<Restart> restart;
  v1::Job ended;
  std::vector<v1::JobState> ended_ranks;
  if (is_attempt_running(before) && !is_attempt_running(updated.job.state())) {
    if (const std::string hold = hold_for_rank0_locked(active, updated, preempted); !hold.empty()) {
      // The attempt goes on until rank 0 has uploaded: only the rank's end is recorded.
      JobRecord held = active.record;
      held.rank_states = updated.rank_states;
      extra.push_back(log_event(hold + (reason.empty() ? "" : " (" + reason + ")")));
      return commit_locked(active, std::move(held), "", std::move(extra));
    }
    ended = active.record.job;
    ended_ranks = updated.rank_states;
    restart = end_attempt_locked(active, updated, why, permanent_failure, preempted);
  }
  const v1::JobState after = updated.job.state();
  std::vector<v1::JobEvent> events;
  if (before != after) events.push_back(state_change_event(after, why));
  for (v1::JobEvent& event : extra) events.push_back(std::move(event));
  try {
    state_.store.update_job(updated, events);
  } catch (const StoreError& error) {
    return internal_error("cannot record job " + updated.job.id() + " as " + state_name(after),
                          error);
  }
  state_.metrics.count_events(static_cast<int64_t>(events.size()));
  after_commit_locked(active, std::move(updated), before, why);
  if (restart) after_restart_locked(ended, ended_ranks, *restart);
  return grpc::Status::OK;
}

std::string JobLifecycle::hold_for_rank0_locked(const ActiveJob& active, const JobRecord& updated,
                                                bool preempted) const {
  const v1::Job& job = active.record.job;
  const std::vector<v1::JobState>& was = active.record.rank_states;
  const std::vector<v1::JobState>& now = updated.rank_states;
  const bool cancelled = updated.cancel_requested && updated.job.state() == v1::JOB_STATE_CANCELLED;
  if (active.world_size <= 1 || (!preempted && !cancelled) || now.size() != was.size() ||
      now.empty() || now[0] != v1::JOB_STATE_RUNNING) {
    return "";
  }
  // A rank other than 0 ends with this update (not a timeout). For a cancel it confirmed it
  // (a rank failing while it stops ends the job at once, as before); for a preemption it had
  // trained: its trainer's stop reaches rank 0's through their collectives, while a rank that
  // never started leaves rank 0 nothing to checkpoint.
  bool rank_ends = false;
  for (size_t r = 1; r < now.size(); ++r) {
    rank_ends |=
        !is_terminal(was[r]) && (preempted ? is_terminal(now[r]) && was[r] == v1::JOB_STATE_RUNNING
                                           : now[r] == v1::JOB_STATE_CANCELLED);
  }
  if (!rank_ends) return "";
  std::string rank0_worker;
  for (const v1::RankAssignment& assignment : job.assignments()) {
    if (assignment.rank() == 0) rank0_worker = assignment.worker_id();
  }
  const auto worker = state_.workers.find(rank0_worker);
  if (worker == state_.workers.end() || worker->second.connection == nullptr ||
      worker->second.job_id != job.id() || worker->second.attempt != job.attempt()) {
    return "";
  }
  return std::string(preempted ? "a rank was preempted" : "a rank stopped for the cancel") +
         "; the attempt ends when rank 0 (worker " + rank0_worker +
         ") has uploaded its last checkpoint and reported its end";
}

std::optional<JobLifecycle::Restart> JobLifecycle::end_attempt_locked(const ActiveJob& active,
                                                                      JobRecord& updated,
                                                                      std::string& reason,
                                                                      bool permanent_failure,
                                                                      bool preempted) {
  const v1::Job& job = active.record.job;
  v1::Job& next = updated.job;
  const bool failed = next.state() == v1::JOB_STATE_FAILED;
  v1::JobAttempt entry = ended_attempt(job, next, reason);
  if (failed && preempted && !updated.cancel_requested && !permanent_failure) {
    // A drain, not a failure: back to the queue at once, the budget untouched.
    entry.set_preempted(true);
    reason = "queued again after " + attempt_preempted_text(job, entry.reason()) +
             " (the restart budget is not used)";
    *next.add_attempts() = std::move(entry);
    clear_attempt(updated);
    return Restart{Clock::duration::zero(), false};
  }
  const int64_t used = restarts_used(job);
  const v1::JobAttempt* previous =
      job.attempts_size() > 0 ? &job.attempts(job.attempts_size() - 1) : nullptr;
  const bool repeated = repeats(previous, entry);
  const bool restartable = failed && !updated.cancel_requested && !permanent_failure;
  const bool restarts = restartable && !repeated && used < active.max_restarts;
  if (restartable && !restarts) {
    // Say why there is no new attempt, so that nobody waits for one.
    next.set_failure_reason(next.failure_reason() +
                            (repeated   ? repeated_text(*previous, entry, used)
                             : used > 0 ? " (after " + restarts_text(used) + ")"
                                        : ""));
    if (reason == entry.reason()) reason = next.failure_reason();
  }
  if (!restarts) {
    *next.add_attempts() = std::move(entry);
    return std::nullopt;
  }
  const int64_t restart = used + 1;
  const Clock::duration backoff = restart_backoff(restart);
  const int64_t backoff_us = std::chrono::duration_cast<std::chrono::microseconds>(backoff).count();
  entry.set_restarted(true);
  *entry.mutable_restart_time() = TimeUtil::MicrosecondsToTimestamp(
      TimeUtil::TimestampToMicroseconds(now_timestamp()) + backoff_us);
  reason = "restarting after " + attempt_failure_text(job, entry.reason()) + " (restart " +
           std::to_string(restart) + " of " + std::to_string(active.max_restarts) + ") in " +
           std::to_string(backoff_us / 1000000) + " s";
  *next.add_attempts() = std::move(entry);
  clear_attempt(updated);
  return Restart{backoff, true};
}

void JobLifecycle::after_restart_locked(const v1::Job& ended,
                                        const std::vector<v1::JobState>& rank_states,
                                        const Restart& restart) {
  if (restart.counted) state_.metrics.count_restart();
  state_.rendezvous.drop_job(ended.id());
  end_ranks_locked(ended, rank_states);
  state_.restart_at[ended.id()] = Clock::now() + restart.backoff;
}

void JobLifecycle::check_timeouts() {
  std::lock_guard lock(state_.mu);
  const Clock::time_point now = Clock::now();
  std::vector<std::string> running;
  for (const auto& [id, active] : state_.active) {
    if (is_attempt_running(active.record.job.state())) running.push_back(id);
  }
  bool ended = false;
  for (const std::string& id : running) {
    const auto it = state_.active.find(id);
    if (it == state_.active.end()) continue;
    const v1::JobState before = it->second.record.job.state();
    check_timeouts_locked(it->second, now);
    const auto after = state_.active.find(id);
    ended |= after == state_.active.end() || after->second.record.job.state() != before;
  }
  if (ended) dispatch_locked();
}

bool JobLifecycle::hold_for_peer_locked(ActiveJob& active, int rank, const std::string& who,
                                        const v1::JobStatusUpdate& message) {
  const JobRecord& record = active.record;
  const int peer = message.has_peer_rank() ? message.peer_rank() : -1;
  const auto& states = record.rank_states;
  if (active.world_size <= 1 || message.state() != v1::JOB_STATE_FAILED || peer < 0 ||
      peer == rank || static_cast<size_t>(peer) >= states.size() ||
      static_cast<size_t>(rank) >= states.size() || message.permanent() || message.preempted() ||
      record.cancel_requested || !is_attempt_running(record.job.state()) ||
      is_terminal(states[static_cast<size_t>(peer)])) {
    return false;
  }
  const std::string reason = who + ": " + message.reason();
  const bool first = active.peer_failure.attempt != record.job.attempt();
  JobRecord updated = record;
  updated.rank_states[static_cast<size_t>(rank)] = v1::JOB_STATE_FAILED;
  const std::string wait = first ? "; the attempt waits up to " +
                                       std::to_string(kPeerReportGrace.count()) + " s for rank " +
                                       std::to_string(peer) + "'s own report, the likely cause"
                                 : "";
  if (!commit_locked(active, std::move(updated), "", {log_event(reason + wait)}).ok()) {
    return true;  // not recorded: the rank's end stays unknown, as a lost report would
  }
  if (first) {
    active.peer_failure = {record.job.attempt(), peer, reason, Clock::now() + kPeerReportGrace};
  }
  return true;
}

// The held peer failure of `active` (hold_for_peer_locked), once its grace has passed: the
// attempt ends with it, naming the peer that did not report.
void JobLifecycle::end_held_peer_failure_locked(ActiveJob& active, Clock::time_point now) {
  const ActiveJob::PeerFailure& held = active.peer_failure;
  const JobRecord& record = active.record;
  if (held.attempt != record.job.attempt() || now < held.deadline) return;
  std::string peer_worker;
  for (const v1::RankAssignment& assignment : record.job.assignments()) {
    if (assignment.rank() == held.peer) peer_worker = assignment.worker_id();
  }
  const auto worker = state_.workers.find(peer_worker);
  const bool connected = worker != state_.workers.end() && worker->second.connection != nullptr;
  // The cause first (the silent peer), then the symptom the held rank reported.
  const std::string what = "rank " + std::to_string(held.peer) + " (worker " + peer_worker +
                           "): no report of its own within " +
                           std::to_string(kPeerReportGrace.count()) + " s" +
                           (connected ? "" : ", its worker is disconnected") + "; " + held.reason;
  JobRecord updated = record;
  const std::string why = end_job_by_rank(updated, v1::JOB_STATE_FAILED, what);
  // On a store error the next check tries again.
  (void)commit_locked(active, std::move(updated), why);
}

void JobLifecycle::check_timeouts_locked(ActiveJob& active, Clock::time_point now) {
  if (active.peer_failure.attempt == active.record.job.attempt() &&
      !active.record.cancel_requested) {
    end_held_peer_failure_locked(active, now);
    return;
  }
  const JobRecord& record = active.record;
  // A job restored at startup has no times yet: its timeouts count from here.
  Clock::time_point& since =
      record.cancel_requested ? active.cancel_requested_at : active.assigned_at;
  if (since == Clock::time_point{}) since = now;
  const double limit = record.cancel_requested ? state_.options.cancel_timeout_seconds
                                               : state_.options.assigned_timeout_seconds;
  const bool applies = record.cancel_requested || record.job.state() == v1::JOB_STATE_ASSIGNED;
  if (!applies || now - since < std::chrono::duration<double>(limit)) return;
  JobRecord updated = record;
  std::string what;
  if (record.cancel_requested) {
    what = ranks_text(active, record.rank_states, not_ended) +
           " did not confirm the cancellation within " + seconds_text(limit) + " s" +
           " (still told to stop; no new job until it reports its end or is gone)";
  } else {
    what = ranks_text(active, record.rank_states, not_running_yet) +
           " did not acknowledge the assignment (no RUNNING) within " + seconds_text(limit) + " s";
  }
  const std::string why = end_job_by_rank(updated, v1::JOB_STATE_FAILED, what);
  // On a store error the next check tries again.
  (void)commit_locked(active, std::move(updated), why);
}

void JobLifecycle::start_due_restarts() {
  std::lock_guard lock(state_.mu);
  if (state_.restart_at.empty()) return;
  const Clock::time_point now = Clock::now();
  bool queued = false;
  for (auto it = state_.restart_at.begin(); it != state_.restart_at.end();) {
    if (it->second > now) {
      ++it;
      continue;
    }
    const auto job = state_.active.find(it->first);
    if (job != state_.active.end() && job->second.record.job.state() == v1::JOB_STATE_QUEUED) {
      requeue_locked(job->second);
      queued = true;
    }
    it = state_.restart_at.erase(it);
  }
  if (queued) dispatch_locked();
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
    state_.restart_at.erase(job_id);
    const std::vector<v1::JobState> rank_states = updated.rank_states;
    state_.active.erase(job_id);  // `active` is gone from here on
    state_.metrics.remove_job(job_id);
    state_.checkpoints.discard_job(job_id);
    state_.rendezvous.drop_job(job_id);
    end_ranks_locked(updated.job, rank_states);
  } else {
    active.record = std::move(updated);
  }
  state_.hub.publish(job_id);
}

void JobLifecycle::end_ranks_locked(const v1::Job& job, const std::vector<v1::JobState>& states) {
  for (const v1::RankAssignment& assignment : job.assignments()) {
    const auto worker = state_.workers.find(assignment.worker_id());
    if (worker == state_.workers.end() || worker->second.job_id != job.id() ||
        worker->second.attempt != job.attempt()) {
      continue;
    }
    const size_t rank = static_cast<size_t>(assignment.rank());
    if (rank < states.size() && is_terminal(states[rank])) {
      state_.release_worker_locked(worker->second);
    } else {
      // Still running: told to stop, and busy until it reports its end or dies.
      state_.send_cancel_locked(worker->second);
    }
  }
}

void JobLifecycle::end_orphaned_job_locked(Worker& worker, const std::string& reason) {
  const auto it = state_.active.find(worker.job_id);
  const int rank = it == state_.active.end() ? -1 : it->second.rank_of(worker.id);
  if (rank < 0 || it->second.record.job.attempt() != worker.attempt) {
    // A rank whose job already ended (or a stale record): nothing more to end.
    state_.release_worker_locked(worker);
    return;
  }
  ActiveJob& active = it->second;
  if (static_cast<size_t>(rank) < active.record.rank_states.size() &&
      is_terminal(active.record.rank_states[static_cast<size_t>(rank)])) {
    // Its rank had ended (a held gang waits for rank 0): losing the worker changes nothing.
    state_.release_worker_locked(worker);
    return;
  }
  JobRecord updated = active.record;
  if (static_cast<size_t>(rank) < updated.rank_states.size()) {
    updated.rank_states[static_cast<size_t>(rank)] = v1::JOB_STATE_FAILED;  // its worker is gone
  }
  // One rank names itself; a gang's reason says which rank was lost.
  const std::string what =
      active.world_size > 1 ? "rank " + std::to_string(rank) + ": " + reason : reason;
  const std::string why = end_job_by_rank(updated, v1::JOB_STATE_FAILED, what);
  // On a store error the worker keeps the job and the next scan tries again.
  (void)commit_locked(active, std::move(updated), why);
}

void JobLifecycle::dispatch_locked() {
  while (!state_.shutting_down) {
    const std::optional<Placement> placement = state_.scheduler.next();
    if (!placement) return;
    const auto job = state_.active.find(placement->job_id);
    std::vector<Worker*> gang;
    std::string missing;
    for (const std::string& id : placement->workers) {
      const auto worker = state_.workers.find(id);
      if (worker == state_.workers.end() || worker->second.connection == nullptr) {
        missing = id;
      } else {
        gang.push_back(&worker->second);
      }
    }
    if (job == state_.active.end() || !missing.empty()) {
      // Bookkeeping out of step: put back whatever still exists.
      log_line("error: scheduler placed job " + placement->job_id + " on worker " +
               (missing.empty() ? placement->worker_id : missing) + ", which " +
               (job == state_.active.end() ? "is not an active job" : "is not connected"));
      if (job != state_.active.end()) requeue_locked(job->second);
      for (Worker* worker : gang)
        state_.scheduler.add_idle_worker(worker->id, worker->device.kind());
      continue;
    }
    if (!assign_locked(job->second, gang)) return;
  }
}

void JobLifecycle::requeue_locked(const ActiveJob& job) {
  state_.scheduler.add_job(job.record.job.id(), job.record.job.priority(), job.record.submit_order,
                           job.device, job.world_size);
}

namespace {

std::string assignment_reason(const std::vector<Worker*>& gang, int64_t attempt) {
  if (gang.size() == 1) {
    return "assigned to worker " + gang[0]->id + " (" + device_text(gang[0]->device) +
           "), attempt " + std::to_string(attempt);
  }
  std::string ranks;
  for (size_t rank = 0; rank < gang.size(); ++rank) {
    ranks += (rank == 0 ? "" : ", ") + std::string("rank ") + std::to_string(rank) + ": " +
             gang[rank]->id + " (" + device_text(gang[rank]->device) + ")";
  }
  return "assigned to " + std::to_string(gang.size()) + " workers (" + ranks + "), attempt " +
         std::to_string(attempt);
}

}  // namespace

bool JobLifecycle::assign_locked(ActiveJob& job, const std::vector<Worker*>& gang) {
  JobRecord updated = job.record;
  updated.job.set_state(v1::JOB_STATE_ASSIGNED);
  updated.job.set_attempt(updated.job.attempt() + 1);
  updated.job.set_worker_id(gang.front()->id);
  updated.job.clear_assignments();
  for (size_t rank = 0; rank < gang.size(); ++rank) {
    v1::RankAssignment* assignment = updated.job.add_assignments();
    assignment->set_rank(static_cast<int32_t>(rank));
    assignment->set_worker_id(gang[rank]->id);
  }
  updated.job.clear_failure_reason();
  updated.rank_states.assign(gang.size(), v1::JOB_STATE_UNSPECIFIED);
  const v1::Job assigned = updated.job;
  const grpc::Status status =
      commit_locked(job, std::move(updated), assignment_reason(gang, assigned.attempt()));
  if (!status.ok()) {
    // The store is failing: leave all of them where they were and try again on the next event.
    requeue_locked(job);
    for (Worker* worker : gang) state_.scheduler.add_idle_worker(worker->id, worker->device.kind());
    return false;
  }
  job.assigned_at = Clock::now();
  job.cancel_requested_at = {};
  const int64_t queued_us = TimeUtil::TimestampToMicroseconds(assigned.create_time());
  const int64_t now_us = TimeUtil::TimestampToMicroseconds(now_timestamp());
  state_.metrics.observe_scheduling_latency(static_cast<double>(now_us - queued_us) * 1e-6);
  for (size_t rank = 0; rank < gang.size(); ++rank) {
    send_assignment_locked(*gang[rank], assigned, static_cast<int>(rank),
                           static_cast<int>(gang.size()));
  }
  return true;
}

void JobLifecycle::send_assignment_locked(Worker& worker, const v1::Job& assigned, int rank,
                                          int world_size) {
  worker.job_id = assigned.id();
  worker.attempt = assigned.attempt();
  worker.rank = rank;
  worker.assigned_on = worker.connection->id();
  worker.confirmed_on = worker.cancel_sent_on = 0;
  worker.restored = false;
  v1::CoordinatorMessage message;
  v1::Assignment* assignment = message.mutable_assignment();
  assignment->set_job_id(assigned.id());
  assignment->set_attempt(assigned.attempt());
  *assignment->mutable_spec() = assigned.spec();
  assignment->set_canonical_spec(assigned.canonical_spec());
  assignment->set_rank(rank);
  assignment->set_world_size(world_size);
  // A failed send means the stream is closing; the worker then misses its heartbeats (or
  // reconnects without the job) and the job fails with that reason.
  worker.connection->send(message);
}

// ---------------------------------------------------------------------------------------------
// SubmitJob and CancelJob.

grpc::Status JobLifecycle::queued_limit_locked(const std::string& owner) const {
  const int64_t limit = state_.options.max_queued_jobs_per_owner;
  if (limit <= 0) return grpc::Status::OK;
  int64_t queued = 0;
  for (const auto& [id, active] : state_.active) {
    const v1::Job& job = active.record.job;
    if (job.state() == v1::JOB_STATE_QUEUED && job.owner() == owner) ++queued;
  }
  if (queued < limit) return grpc::Status::OK;
  return grpc::Status(
      grpc::StatusCode::RESOURCE_EXHAUSTED,
      (owner.empty() ? std::string("the coordinator's callers") : "\"" + owner + "\"") +
          " already " + (owner.empty() ? "have " : "has ") + std::to_string(queued) +
          " QUEUED jobs, the limit per user (" + "max_queued_jobs_per_user: " +
          std::to_string(limit) + "); wait for some to start or cancel some");
}

grpc::Status JobLifecycle::submit(const v1::SubmitJobRequest& request, const std::string& owner,
                                  v1::SubmitJobResponse* response) {
  if (!request.has_spec() && request.spec_text().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "spec: required (the job spec as a JSON object, or as spec_text)");
  }
  SubmittedSpec submitted;
  if (grpc::Status status = read_spec(request, &submitted); !status.ok()) return status;
  const JobSpec& spec = submitted.spec;
  std::lock_guard lock(state_.mu);
  if (state_.shutting_down) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the coordinator is shutting down");
  }
  if (grpc::Status limit = queued_limit_locked(owner); !limit.ok()) return limit;
  JobRecord record;
  v1::Job& job = record.job;
  job.set_owner(owner);
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
  active.world_size = spec.resources.world_size;
  active.max_restarts = spec.resources.max_restarts;
  requeue_locked(active);
  log_line("job " + job.id() + ": submitted" + (job.name().empty() ? "" : " (" + job.name() + ")") +
           ", priority " + std::to_string(job.priority()) + ", device " + spec.resources.device +
           (active.world_size > 1 ? ", " + std::to_string(active.world_size) + " ranks" : ""));
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
  const v1::Job job = updated.job;
  std::string workers;
  for (const v1::RankAssignment& assignment : job.assignments()) {
    workers += (workers.empty() ? "" : ", ") + assignment.worker_id();
  }
  const std::string whom = job.assignments_size() > 1 ? "workers " + workers : "worker " + workers;
  if (grpc::Status status =
          commit_locked(active, std::move(updated), "",
                        {log_event("cancellation requested; waiting for " + whom + " to stop")});
      !status.ok()) {
    return status;
  }
  active.cancel_requested_at = Clock::now();
  log_line("job " + job.id() + ": cancellation requested, telling " + whom);
  for (const v1::RankAssignment& assignment : job.assignments()) {
    const auto worker = state_.workers.find(assignment.worker_id());
    if (worker != state_.workers.end() && worker->second.job_id == job.id()) {
      state_.send_cancel_locked(worker->second);
    }
  }
  return grpc::Status::OK;
}

}  // namespace lomo::server
