// Job lifecycle: the state machine of every job, and where jobs meet workers.
//
// States: QUEUED → ASSIGNED (sent to its workers, attempt + 1) → RUNNING (a worker says so) →
// SUCCEEDED | FAILED | CANCELLED. Cancel ends a queued job at once and asks the workers to stop an
// assigned or running one (CANCELLED when one confirms, or when one dies). Every transition is one
// store transaction with its StateChange event, committed before anyone is told about it, and is
// mirrored in memory, metrics and the scheduler in the same critical section (commit_locked).
//
// Gangs: a job of world_size N is placed all-or-nothing on N workers (scheduler.h), each getting
// an Assignment with its rank. It is RUNNING when the first rank says so, SUCCEEDED once every
// rank has, and FAILED (or CANCELLED) as soon as one rank fails (or confirms a cancel) or its
// worker dies; the ranks still running are then told to stop and their workers stay busy until
// they report their end or die. World size 1 is the same machine with one rank.
//
// Restarts: an attempt that ends FAILED, without a cancel pending and not permanently (a bad spec
// or data, a non-finite gradient: JobStatusUpdate.permanent), puts the job back to QUEUED while
// fewer than resources.max_restarts restarts were used: every other rank is told to stop, the
// ended attempt is recorded in Job.attempts (rank, worker, reason, step), and after a backoff of
// 1, 2, 4, ... s (at most 60 s) the job is queued again; its next attempt resumes from the job's
// last committed checkpoint (the daemon fetches it). An attempt that fails with the same reason at
// the same step as the one before it stops the job early; a spent budget ends it FAILED "after N
// restarts". Every attempt that ends is recorded in Job.attempts, whatever its end.
//
// Preemption: an attempt a rank ends FAILED with JobStatusUpdate.preempted (its worker got SIGTERM,
// or a gang peer's did; its checkpoint is committed) is not a failure: the job is QUEUED again at
// once, the attempt recorded with JobAttempt.preempted, and the restart budget is not used.
//
// A gang's last checkpoint: rank 0 alone uploads, after its trainer stopped. So when another rank
// ends first by confirming a cancel or by a preemption, the attempt is held (its state unchanged,
// that rank recorded as ended) until rank 0 reports its own end, its worker is gone, or the cancel
// timeout passes; rank 0's checkpoint is then committed before the attempt ends.
//
// Operational timeouts (check_timeouts): an ASSIGNED job none of whose ranks reported RUNNING
// within CoordinatorOptions::assigned_timeout_seconds fails (transient: restarted within budget);
// a cancel not confirmed within cancel_timeout_seconds ends the job CANCELLED, the reason naming
// the workers that did not confirm (they are still told to stop and get no job until they do).
//
// Cause, not symptom: when a gang's rank dies, its peers' collectives fail at once, and their
// reports ("collective all_reduce failed (peer rank 0)") can reach the coordinator before the dead
// rank's own. A report naming a peer that still runs (JobStatusUpdate.peer_rank) therefore only
// records that rank's end; the attempt ends with the peer's report when it comes within
// kPeerReportGrace, else with the held one, naming the silent peer. So attempts record what
// failed, and a deterministic failure repeats with the same reason (the early stop can see it).
#pragma once

#include <grpcpp/support/status.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "lomo/v1/jobs.pb.h"
#include "lomo/v1/workers.pb.h"
#include "server/coordinator_state.h"

namespace lomo::server {

// How long a gang's attempt waits for the report of the rank another rank's failed collective
// points at (hold_for_peer_locked). A killed trainer's daemon reports within milliseconds; a lost
// daemon never does, and its job then restarts this much later.
inline constexpr std::chrono::seconds kPeerReportGrace{5};

// The one rule for how a rank's end ends its job, whichever way it ended (the rank failed,
// stopped, or its worker is gone): with a cancel pending the job is CANCELLED, `what` (what the
// rank said or what happened to it) kept as the detail, since a rank failing while its gang stops
// (e.g. "rank 0 closed its communicator") is the cancel taking effect; otherwise the job ends
// `rank_end` (FAILED records `what` as the failure reason). Sets the state and end time of
// `updated` and returns the state change's reason.
std::string end_job_by_rank(JobRecord& updated, v1::JobState rank_end, const std::string& what);

class JobLifecycle {
 public:
  explicit JobLifecycle(CoordinatorState& state) : state_(state) {}

  // Startup: loads QUEUED, ASSIGNED and RUNNING jobs from the store. Queued jobs are queued
  // again; assigned and running ones wait heartbeat_timeout for their worker to reconnect; a job
  // whose stored spec or worker no longer makes sense fails with the reason. Takes mu.
  void restore();

  // SubmitJob and CancelJob up to their commit (not yet durable). Take mu.
  // A new QUEUED job owned by `owner`; RESOURCE_EXHAUSTED when that owner has
  // options.max_queued_jobs_per_owner jobs QUEUED already.
  grpc::Status submit(const v1::SubmitJobRequest& request, const std::string& owner,
                      v1::SubmitJobResponse* response);
  grpc::Status cancel(const v1::CancelJobRequest& request, v1::CancelJobResponse* response);

  // Persists `updated` (a changed copy of active.record) with a StateChange event when the state
  // changed, plus `extra` events; then updates memory, metrics and the scheduler, and frees the
  // worker of a job that ended. `active` is invalid afterwards if the job ended. Requires mu.
  // `permanent_failure`: an attempt ending FAILED must not be restarted (see Restarts above).
  grpc::Status commit_locked(ActiveJob& active, JobRecord updated, const std::string& reason,
                             std::vector<v1::JobEvent> extra = {}, bool permanent_failure = false,
                             bool preempted = false);
  // A gang's rank failed because its collective with another rank failed (message.peer_rank)
  // while that peer still runs: the rank's end is recorded and the attempt waits up to
  // kPeerReportGrace for the peer's own report (the cause, which then ends the attempt) before it
  // ends with this one (check_timeouts). True when the update was taken that way; `who` names the
  // rank ("rank R (worker W)"). Requires mu.
  bool hold_for_peer_locked(ActiveJob& active, int rank, const std::string& who,
                            const v1::JobStatusUpdate& message);
  // Ends an assigned or running job one of whose workers is gone (end_job_by_rank with FAILED and
  // `reason`, prefixed with the rank in a gang). A worker whose job has already ended just becomes
  // free. Requires mu.
  void end_orphaned_job_locked(Worker& worker, const std::string& reason);
  // Assigns queued jobs to idle workers while both exist. Requires mu.
  void dispatch_locked();
  // Queues the jobs whose restart backoff has passed and dispatches. Takes mu.
  void start_due_restarts();
  // Ends the jobs whose ASSIGNED or cancel timeout has passed (see above). Takes mu.
  void check_timeouts();

 private:
  // OK, or RESOURCE_EXHAUSTED naming the limit when `owner` has enough QUEUED jobs already.
  grpc::Status queued_limit_locked(const std::string& owner) const;

  enum class Restored { kQueued, kWaitingForWorker, kFailed };
  Restored restore_job_locked(const JobRecord& record, Clock::time_point now);
  // Why a restored ASSIGNED/RUNNING job cannot wait for its workers, or "" once every rank's
  // worker waits for it.
  std::string wait_for_workers_locked(ActiveJob& active, Clock::time_point now);
  // Stores a new QUEUED job under a fresh random id (retrying a collision); INTERNAL when the
  // store fails.
  grpc::Status insert_new_job_locked(JobRecord& record, std::vector<v1::JobEvent>& events);
  // Records the attempt that `updated` ends in Job.attempts and decides whether the job restarts:
  // then `updated` becomes QUEUED, `reason` says why and the backoff is returned.
  struct Restart {
    Clock::duration backoff{};
    bool counted = true;  // false for a preemption: not a restart of the budget
  };
  std::optional<Restart> end_attempt_locked(const ActiveJob& active, JobRecord& updated,
                                            std::string& reason, bool permanent_failure,
                                            bool preempted);
  // After a restart's commit: the ended attempt's ranks are freed or told to stop, and the job
  // waits `restart.backoff` before it is queued.
  void after_restart_locked(const v1::Job& ended, const std::vector<v1::JobState>& rank_states,
                            const Restart& restart);
  // A gang's rank other than 0 ended by a cancel or a preemption while rank 0, still running on a
  // connected worker, has yet to upload its last checkpoint: the text of the hold, else "".
  std::string hold_for_rank0_locked(const ActiveJob& active, const JobRecord& updated,
                                    bool preempted) const;
  // Ends `active` if one of its operational timeouts has passed. Requires mu.
  void check_timeouts_locked(ActiveJob& active, Clock::time_point now);
  // Ends `active`'s attempt with its held peer failure once kPeerReportGrace has passed.
  void end_held_peer_failure_locked(ActiveJob& active, Clock::time_point now);
  // The state-change bookkeeping after a commit: metrics, log line, scheduler, hub.
  void after_commit_locked(ActiveJob& active, JobRecord updated, v1::JobState before,
                           const std::string& reason);
  // Records one placement (gang[r] runs rank r) and sends every rank its Assignment; false when
  // the store refused it (everything is put back).
  bool assign_locked(ActiveJob& job, const std::vector<Worker*>& gang);
  void send_assignment_locked(Worker& worker, const v1::Job& assigned, int rank, int world_size);
  // Puts a job (back) into the scheduler's queue.
  void requeue_locked(const ActiveJob& job);
  // The job ended: frees the workers whose ranks ended (`states`, by rank) and tells the others
  // to stop; those stay busy until they report their end or die.
  void end_ranks_locked(const v1::Job& job, const std::vector<v1::JobState>& states);
  // CancelJob for a job that is no longer active: its stored state answers.
  grpc::Status cancel_inactive(const std::string& job_id, v1::CancelJobResponse* response);
  // CancelJob for an assigned or running job: record the request and tell the worker.
  grpc::Status request_cancel_locked(ActiveJob& active);

  CoordinatorState& state_;
};

}  // namespace lomo::server
