// The job lifecycle: the state machine that ties the store, the scheduler, worker connections,
// the checkpoint store and metrics together. Transport-free: the gRPC services and the REST
// handlers translate requests into these calls, and errors come back as grpc::Status.
//
// States: QUEUED → ASSIGNED (sent to a worker, attempt + 1) → RUNNING (the worker says so) →
// SUCCEEDED | FAILED | CANCELLED (the worker says so). CancelJob ends a queued job at once and asks
// the worker to stop an assigned or running one (CANCELLED when it confirms, or when it dies). A
// worker that misses heartbeats for heartbeat_timeout fails its job with the reason. Every
// transition is one store transaction with its StateChange event.
//
// Durability: every transition is committed before anyone is told about it, so a killed
// coordinator loses nothing. Submissions, cancellations and checkpoint commits are also made
// durable against a power cut (Store::when_durable, one shared fdatasync) before they are
// acknowledged; what workers report becomes so within kDurabilityDelay, from the background thread.
//
// Threading: one mutex (mu_) orders every transition and is held across its store commit (not the
// fdatasync), so the store, the in-memory mirror of active jobs and the scheduler always agree.
// Reads (GetJob, ListJobs, events) go to the store's reader connections without taking mu_. Calls
// that write block on SQLite: callers run them on an Executor, never on a gRPC callback thread.
#pragma once

#include <grpcpp/support/status.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "lomo/v1/jobs.pb.h"
#include "lomo/v1/workers.pb.h"
#include "server/checkpoint_store.h"
#include "server/event_hub.h"
#include "server/metrics.h"
#include "server/scheduler.h"
#include "server/store.h"
#include "server/worker_connection.h"

namespace lomo::server {

bool is_terminal(v1::JobState state);

// How long a worker's report (a state, events) may stay durable against a killed process only,
// before the background thread makes it durable against a power cut too.
inline constexpr std::chrono::milliseconds kDurabilityDelay{100};

struct CoordinatorOptions {
  double heartbeat_timeout_seconds = 10.0;
  int64_t heartbeat_interval_ms = 1000;
};

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

  // Calls `done` exactly once: at once with an error, or with OK once what the call changed is
  // durable (then on the store's sync thread). `response` is filled before an OK.
  using Done = std::function<void(const grpc::Status&)>;

  // JobService.
  void submit_job(const v1::SubmitJobRequest& request, v1::SubmitJobResponse* response, Done done);
  grpc::Status get_job(const v1::GetJobRequest& request, v1::GetJobResponse* response);
  grpc::Status list_jobs(const v1::ListJobsRequest& request, v1::ListJobsResponse* response);
  void cancel_job(const v1::CancelJobRequest& request, v1::CancelJobResponse* response, Done done);
  grpc::Status list_checkpoints(const v1::ListCheckpointsRequest& request,
                                v1::ListCheckpointsResponse* response);
  // The job and up to `limit` of its events after `after_sequence` (WatchJob, REST events).
  grpc::Status read_events(const std::string& job_id, int64_t after_sequence, int limit,
                           EventBatch* batch);
  EventHub& event_hub() { return hub_; }
  // A committed checkpoint's record and the directory holding its files.
  grpc::Status find_checkpoint(const std::string& checkpoint_id, v1::CheckpointInfo* info,
                               std::filesystem::path* directory);

  // WorkerService: one call per message, in the order the stream delivered them. An error from
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
  void on_checkpoint_chunk(const std::shared_ptr<WorkerConnection>& connection,
                           const v1::CheckpointChunk& chunk);
  void on_disconnect(const std::shared_ptr<WorkerConnection>& connection);

  // One dead-worker scan; the background thread runs it every tenth of the timeout.
  void check_heartbeats();

 private:
  using Clock = std::chrono::steady_clock;

  struct ActiveJob {
    JobRecord record;
    v1::DeviceKind device = v1::DEVICE_KIND_UNSPECIFIED;
  };

  struct Worker {
    std::string id;
    v1::DeviceInfo device;
    std::shared_ptr<WorkerConnection> connection;  // null while disconnected
    Clock::time_point last_seen;                   // while disconnected
    std::string job_id;                            // the attempt it owns, if any
    int64_t attempt = 0;
    uint64_t assigned_on = 0;     // connection that received the Assignment (0: none)
    uint64_t confirmed_on = 0;    // connection whose heartbeat or status named the attempt
    uint64_t cancel_sent_on = 0;  // connection that received CancelAssignment
    bool restored = false;        // job restored at startup and the worker not seen since
  };

  grpc::Status submit_job_committed(const v1::SubmitJobRequest& request,
                                    v1::SubmitJobResponse* response);
  grpc::Status cancel_job_committed(const v1::CancelJobRequest& request,
                                    v1::CancelJobResponse* response);
  // Calls `done` with OK once everything committed so far is durable, or with INTERNAL naming
  // `what` if the sync failed.
  void when_durable(Done done, const std::string& what);
  // Persists `updated` (a changed copy of active.record) with a StateChange event when the state
  // changed, plus `extra` events; then updates memory, metrics and the scheduler. `active` is
  // invalid afterwards if the job ended. Requires mu_.
  grpc::Status commit_locked(ActiveJob& active, JobRecord updated, const std::string& reason,
                             std::vector<v1::JobEvent> extra = {});
  // Ends an assigned or running job whose worker is gone: CANCELLED if a cancel was pending,
  // else FAILED with `reason`. Requires mu_.
  void end_orphaned_job_locked(Worker& worker, const std::string& reason);
  // Assigns queued jobs to idle workers while both exist. Requires mu_.
  void dispatch_locked();
  // The worker whose current connection this is, or nullptr. Requires mu_.
  Worker* worker_for_locked(const WorkerConnection& connection);
  // Why `worker` may not report on (job_id, attempt), or "" if it may. Requires mu_.
  std::string ownership_problem_locked(const Worker* worker, const std::string& job_id,
                                       int64_t attempt);
  void send_cancel_locked(Worker& worker);
  void disconnect_locked(Worker& worker);
  std::string new_id_locked(const std::string& prefix);
  void background_loop();

  const CoordinatorOptions options_;
  Store& store_;
  CheckpointStore& checkpoints_;
  Metrics& metrics_;
  EventHub hub_;

  mutable std::mutex mu_;
  bool shutting_down_ = false;
  std::unordered_map<std::string, ActiveJob> active_;      // QUEUED, ASSIGNED, RUNNING
  std::unordered_map<std::string, Worker> workers_;        // connected, or owning a job
  std::unordered_map<uint64_t, std::string> connections_;  // connection id → worker id
  Scheduler scheduler_;
  std::mt19937_64 random_;

  std::mutex sweeper_mu_;
  std::condition_variable sweeper_wake_;
  bool sweeper_stop_ = false;
  std::thread sweeper_;
};

}  // namespace lomo::server
