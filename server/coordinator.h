// The coordinator: the composition root of the four roles that keep jobs and workers (see
// coordinator_state.h for the roles and why they share one state under one mutex), its startup,
// shutdown and background thread, and the one surface the transports (gRPC services, REST) call.
// Transport-free: requests come in as messages, errors go back as grpc::Status.
//
// Durability: every transition is committed before anyone is told about it, so a killed
// coordinator loses nothing. Submissions, cancellations and checkpoint commits are also made
// durable against a power cut (Store::when_durable, one shared fdatasync) before they are
// acknowledged; what workers report becomes so within kDurabilityDelay, from the background thread.
//
// Threading: calls that write block on SQLite (submit, cancel, every worker message): callers run
// them on an Executor, never on a gRPC callback thread. Reads (get_job, list_jobs, events,
// checkpoints) go to the store's reader connections without the coordinator's lock.
#pragma once

#include <grpcpp/support/status.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "lomo/v1/jobs.pb.h"
#include "lomo/v1/workers.pb.h"
#include "server/checkpoint_commit.h"
#include "server/coordinator_state.h"
#include "server/event_hub.h"
#include "server/job_lifecycle.h"
#include "server/job_queries.h"
#include "server/job_text.h"
#include "server/worker_registry.h"

namespace lomo::server {

// How long a worker's report (a state, events) may stay durable against a killed process only,
// before the background thread makes it durable against a power cut too.
inline constexpr std::chrono::milliseconds kDurabilityDelay{100};

class Coordinator {
 public:
  Coordinator(CoordinatorOptions options, Store& store, CheckpointStore& checkpoints,
              Metrics& metrics);
  ~Coordinator();  // stop()
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  // Restores active jobs from the store (jobs that were assigned wait heartbeat_timeout for
  // their worker to reconnect), removes uncommitted checkpoint directories, and starts
  // dead-worker detection. Throws StoreError.
  void start();
  // Refuses new submissions and registrations, stops dead-worker detection, wakes every event
  // reader and closes worker streams (workers keep training and reconnect to the next
  // coordinator, which keeps their jobs). Idempotent.
  void begin_shutdown();
  bool shutting_down() const;
  // Joins the dead-worker thread. Idempotent.
  void stop();

  using Done = server::Done;

  // JobService. `done` is called exactly once; `response` is filled before an OK.
  // `owner`: the submitting token's name (Job.owner), "" without authentication.
  void submit_job(const v1::SubmitJobRequest& request, const std::string& owner,
                  v1::SubmitJobResponse* response, Done done);
  void cancel_job(const v1::CancelJobRequest& request, v1::CancelJobResponse* response, Done done);
  grpc::Status get_job(const v1::GetJobRequest& request, v1::GetJobResponse* response) {
    return queries_.get_job(request, response);
  }
  grpc::Status list_jobs(const v1::ListJobsRequest& request, v1::ListJobsResponse* response,
                         const std::string* owner = nullptr) {
    return queries_.list_jobs(request, response, owner);
  }
  grpc::Status list_checkpoints(const v1::ListCheckpointsRequest& request,
                                v1::ListCheckpointsResponse* response) {
    return queries_.list_checkpoints(request, response);
  }
  // The job and up to `limit` of its events after `after_sequence` (WatchJob, REST events).
  grpc::Status read_events(const std::string& job_id, int64_t after_sequence, int limit,
                           EventBatch* batch) {
    return queries_.read_events(job_id, after_sequence, limit, batch);
  }
  // A committed checkpoint's record and the directory holding its files.
  grpc::Status find_checkpoint(const std::string& checkpoint_id, v1::CheckpointInfo* info,
                               std::filesystem::path* directory) {
    return queries_.find_checkpoint(checkpoint_id, info, directory);
  }
  EventHub& event_hub() { return hub_; }

  // WorkerService.FetchCheckpoint: the newest committed checkpoint of the request's job, for the
  // worker that owns the request's attempt (PERMISSION_DENIED for anyone else); `*found` false
  // when the job has none.
  grpc::Status find_checkpoint_to_resume(const v1::FetchCheckpointRequest& request,
                                         v1::CheckpointInfo* info, std::filesystem::path* directory,
                                         bool* found) {
    *found = false;
    if (grpc::Status status = registry_.check_fetch(request); !status.ok()) return status;
    return queries_.latest_checkpoint(request.job_id(), info, directory, found);
  }

  // WorkerService.RendezvousSet / RendezvousGet (see WorkerRegistry). Take the lock: callers run
  // them on an Executor.
  grpc::Status rendezvous_set(const v1::RendezvousSetRequest& request) {
    return registry_.rendezvous_set(request);
  }
  grpc::Status rendezvous_get(const v1::RendezvousGetRequest& request,
                              v1::RendezvousGetResponse* response) {
    return registry_.rendezvous_get(request, response);
  }

  // WorkerService: one call per message, in the order the stream delivered them (see
  // WorkerRegistry and CheckpointCommit).
  grpc::Status on_register(const std::shared_ptr<WorkerConnection>& connection,
                           const v1::Register& message) {
    return registry_.on_register(connection, message);
  }
  void on_heartbeat(const std::shared_ptr<WorkerConnection>& connection,
                    const v1::Heartbeat& message) {
    registry_.on_heartbeat(connection, message);
  }
  void on_status(const std::shared_ptr<WorkerConnection>& connection,
                 const v1::JobStatusUpdate& message) {
    registry_.on_status(connection, message);
  }
  void on_events(const std::shared_ptr<WorkerConnection>& connection,
                 const v1::JobEvents& message) {
    registry_.on_events(connection, message);
  }
  void on_checkpoint_chunk(const std::shared_ptr<WorkerConnection>& connection,
                           const v1::CheckpointChunk& chunk) {
    checkpoint_commit_.on_chunk(connection, chunk);
  }
  void on_disconnect(const std::shared_ptr<WorkerConnection>& connection) {
    registry_.on_disconnect(connection);
  }

  // One dead-worker scan; the background thread runs it every tenth of the timeout.
  void check_heartbeats() { registry_.check_heartbeats(); }

  // The listeners accept connections from now on: no worker's silence before this moment counts
  // (a restored worker could not have reached a coordinator that was still opening its store;
  // under load that took long enough for a worker to miss the re-attach window).
  void serving_from_now() { registry_.grant_grace(Clock::now()); }

 private:
  void background_loop();
  // A gap between two background ticks longer than this means the coordinator itself stalled.
  static Clock::duration stall_threshold(const CoordinatorOptions& options, Clock::duration tick);

  EventHub hub_;
  CoordinatorState state_;  // refers to hub_, so declared after it
  JobLifecycle lifecycle_;
  WorkerRegistry registry_;
  CheckpointCommit checkpoint_commit_;
  JobQueries queries_;

  std::mutex sweeper_mu_;
  std::condition_variable sweeper_wake_;
  bool sweeper_stop_ = false;
  std::thread sweeper_;
};

}  // namespace lomo::server
