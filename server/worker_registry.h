// Worker registry and sessions: who is connected, what each worker owns, and what its stream
// says. A worker registers (a second stream with the same id replaces the first), heartbeats the
// attempt it runs, reports the attempt's state and events, and disconnects or goes silent. Reports
// count only from the worker that owns the job's current attempt. A worker silent for
// heartbeat_timeout is dead: its job ends (through JobLifecycle) and its stream is closed.
#pragma once

#include <grpcpp/support/status.h>

#include <memory>
#include <string>

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

  // One dead-worker scan (the coordinator's background thread runs it every tenth of the
  // timeout). Takes mu.
  void check_heartbeats();
  // Shutdown: ends every worker stream with UNAVAILABLE (workers keep training and reconnect to
  // the next coordinator). Requires mu.
  void close_streams_locked();

 private:
  // The heartbeat names something other than the worker's own attempt, on a stream that never
  // confirmed it: the attempt is lost.
  void lose_unconfirmed_attempt_locked(Worker& worker, const v1::Heartbeat& message);
  // The job record after a status report, with the reason; false when nothing is to change.
  bool apply_status(const Worker& worker, const v1::JobStatusUpdate& message, JobRecord* updated,
                    std::string* reason) const;
  // A worker silent for `silent` seconds: ends its job and closes its stream. Returns true when
  // a stream was closed (the worker was connected).
  bool expire_worker_locked(Worker& worker, double silent);

  CoordinatorState& state_;
  JobLifecycle& lifecycle_;
};

}  // namespace lomo::server
