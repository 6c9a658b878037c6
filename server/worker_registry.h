// Worker registry and sessions: who is connected, what each worker owns, and what its stream
// says. A worker registers (a second stream with the same id replaces the first), heartbeats the
// attempt it runs, reports the attempt's state and events, and disconnects or goes silent. Reports
// count only from a worker that runs a rank of the job's current attempt. A worker silent for
// heartbeat_timeout is dead: its job ends (through JobLifecycle) and its stream is closed.
//
// A worker is given no job until a heartbeat says it runs nothing (Worker::unsettled): the
// daemon sends one as soon as it is registered, so a new worker waits at most that long.
//
// Gangs: every rank reports states, logs and heartbeats; only rank 0's metrics and evaluations
// count (the others' are dropped) and only rank 0 uploads checkpoints (CheckpointCommit); a
// gang's log lines and status reasons are recorded as "rank R (worker W): ...". The rendezvous
// key-value service (rendezvous.h) is authorised here: a connected worker that runs a rank of
// exactly the attempt named.
#pragma once

#include <grpcpp/support/status.h>

#include <memory>
#include <string>
#include <vector>

#include "lomo/v1/workers.pb.h"
#include "server/coordinator_state.h"
#include "server/job_lifecycle.h"

namespace lomo::server {

class WorkerRegistry {
 public:
  WorkerRegistry(CoordinatorState& state, JobLifecycle& lifecycle)
      : state_(state), lifecycle_(lifecycle) {}

  // One call per message, in the order the stream delivered them; each takes mu. An error from
  // on_register ends the stream with it.
  grpc::Status on_register(const std::shared_ptr<WorkerConnection>& connection,
                           const v1::Register& message);
  // Called for a heartbeat whose (job, attempt) differs from the previous one on the stream;
  // the stream itself records the time of every heartbeat.
  void on_heartbeat(const std::shared_ptr<WorkerConnection>& connection,
                    const v1::Heartbeat& message);
  void on_status(const std::shared_ptr<WorkerConnection>& connection,
                 const v1::JobStatusUpdate& message);
  void on_events(const std::shared_ptr<WorkerConnection>& connection, const v1::JobEvents& message);
  void on_disconnect(const std::shared_ptr<WorkerConnection>& connection);

  // FetchCheckpoint's permission: OK when `worker_id` is connected and owns (job_id, attempt),
  // else PERMISSION_DENIED saying why. Takes mu.
  grpc::Status check_fetch(const v1::FetchCheckpointRequest& request);

  // WorkerService.RendezvousSet / RendezvousGet: PERMISSION_DENIED unless `worker_id` is
  // connected and runs a rank of (job_id, attempt); FAILED_PRECONDITION once that attempt has
  // ended; then the limits of Rendezvous. Take mu.
  grpc::Status rendezvous_set(const v1::RendezvousSetRequest& request);
  grpc::Status rendezvous_get(const v1::RendezvousGetRequest& request,
                              v1::RendezvousGetResponse* response);

  // One dead-worker scan (the coordinator's background thread runs it every tenth of the
  // timeout). A connected worker is dead after heartbeat_timeout of silence; one whose stream
  // broke after the re-attach window (max of reattach_window and heartbeat_timeout), which covers
  // its reconnect backoff. Takes mu.
  void check_heartbeats();
  // The coordinator itself was not running (SIGSTOP, a paused VM, swapping) until `woke`: the
  // silence of every worker counts from then, so that heartbeats which could not be read during
  // the stall do not make healthy workers look dead. Takes mu.
  void grant_grace(Clock::time_point woke);
  // Shutdown: ends every worker stream with UNAVAILABLE (workers keep training and reconnect to
  // the next coordinator). Requires mu.
  void close_streams_locked();

 private:
  // grant_grace: silence is never counted from before this (guarded by mu).
  Clock::time_point silence_counted_from_{};
  // The heartbeat names something other than the worker's own attempt, on a stream that never
  // confirmed it: the attempt is lost.
  void lose_unconfirmed_attempt_locked(Worker& worker, const v1::Heartbeat& message);
  // The job record after a status report, with the reason; false when nothing is to change.
  bool apply_status(const Worker& worker, const v1::JobStatusUpdate& message, JobRecord* updated,
                    std::string* reason) const;
  // The same for one rank of a gang: RUNNING on the first rank's word, SUCCEEDED once every rank
  // has, FAILED or CANCELLED on any rank's; `events` gets what a rank said that does not change
  // the job's state.
  bool apply_rank_status(const ActiveJob& active, int rank, const Worker& worker,
                         const v1::JobStatusUpdate& message, JobRecord* updated,
                         std::string* reason, std::vector<v1::JobEvent>* events) const;
  // A rank of an ended job reports: its end frees the worker (and is recorded on the job).
  void end_draining_rank_locked(Worker& worker, const v1::JobStatusUpdate& message);
  // Records "rank R (worker W): STATE after the job ended[: reason]" on the job.
  void record_late_rank_end_locked(const Worker& worker, int rank,
                                   const v1::JobStatusUpdate& message);
  // Worker::unsettled after this heartbeat (set while it names an attempt the worker does not
  // own, cleared once it names none or the worker's own); an idle worker that becomes unsettled
  // is made busy. Returns true when the worker just settled.
  bool update_settled_locked(Worker& worker, const v1::Heartbeat& message, bool reports_own_job);
  grpc::Status rendezvous_problem_locked(const std::string& worker_id, const std::string& job_id,
                                         int64_t attempt) const;
  // A worker silent for `silent` seconds: ends its job and closes its stream. Returns true when
  // a stream was closed (the worker was connected).
  bool expire_worker_locked(Worker& worker, double silent);
  // How long `worker` may stay silent before it is declared dead. Requires mu.
  double allowed_silence_locked(const Worker& worker) const;

  CoordinatorState& state_;
  JobLifecycle& lifecycle_;
};

}  // namespace lomo::server
