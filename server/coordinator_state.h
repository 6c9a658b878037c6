// The coordinator's in-memory state and the collaborators its roles share (store, checkpoint
// store, metrics, event hub). Four roles work on it:
//
//   JobLifecycle      (job_lifecycle.h)     submit, cancel, every job transition, assignment
//   WorkerRegistry    (worker_registry.h)   worker streams: register, heartbeats, reports, deaths
//   CheckpointCommit  (checkpoint_commit.h) checkpoint uploads: receive, publish, record, ack
//   JobQueries        (job_queries.h)       read-only answers from the store (no lock)
//
// Why one state object under one mutex, rather than one lock per role: almost every change
// touches jobs and workers together (an assignment takes a queued job and an idle worker; a
// worker's death ends its job; a job's end frees its worker; a checkpoint commit must see that the
// uploading worker still owns the attempt) and is committed to the store while the lock is held,
// so that the store, this mirror and the scheduler always agree. Per-role locks would need a lock
// order for each of those paths and gain nothing: the critical sections are short, and their store
// commits are serialised by SQLite's single writer anyway. So the roles are separate classes over
// this one state; a role's public entry points take `mu`, and a function named `*_locked` requires
// it. Store reads and checkpoint file I/O happen without it.
//
// Lock order: mu → checkpoint store → upload, mu → worker stream, and mu → the scheduler's
// published queue heads (a leaf, read by queries without mu). Streams and the event hub
// never call back into the coordinator while holding their own locks.
#pragma once

#include <grpcpp/support/status.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/reconnect.h"
#include "lomo/v1/workers.pb.h"
#include "server/checkpoint_store.h"
#include "server/event_hub.h"
#include "server/metrics.h"
#include "server/rendezvous.h"
#include "server/scheduler.h"
#include "server/store.h"
#include "server/worker_connection.h"

namespace lomo::server {

struct CoordinatorOptions {
  double heartbeat_timeout_seconds = 10.0;
  int64_t heartbeat_interval_ms = 1000;
  // Committed checkpoints kept per job, newest first; older ones are deleted after a commit
  // (0: keep all). CheckpointCommit::apply_retention_locked.
  int keep_checkpoints = 3;
  // Also keep the checkpoint whose step has the lowest eval loss (an EvalResult at that step).
  bool keep_best_checkpoint = false;
  // An ASSIGNED job none of whose ranks reports RUNNING fails (transient) after this; a cancel no
  // rank confirms ends CANCELLED after this (JobLifecycle::check_timeouts).
  double assigned_timeout_seconds = 600;
  double cancel_timeout_seconds = 300;
  // A worker whose stream broke keeps its attempt this long (at least heartbeat_timeout); see
  // server/config.h and common/reconnect.h for how it relates to the workers' backoff.
  double reattach_window_seconds = std::chrono::duration<double>(kDefaultReattachWindow).count();
  // QUEUED jobs one owner may have at a time (0: no limit); see server/config.h.
  int64_t max_queued_jobs_per_owner = 1000;
};

// Called exactly once: at once with an error, or with OK once what the call changed is durable
// (then on the store's sync thread).
using Done = std::function<void(const grpc::Status&)>;

using Clock = std::chrono::steady_clock;

// A job that is QUEUED, ASSIGNED or RUNNING: its stored record as last committed.
struct ActiveJob {
  JobRecord record;
  v1::DeviceKind device = v1::DEVICE_KIND_UNSPECIFIED;
  int64_t world_size = 1;    // resources.world_size: the ranks of each attempt
  int64_t max_restarts = 0;  // resources.max_restarts: new attempts after failures
  // In memory only (a restored job counts from the coordinator's start): when the current attempt
  // was assigned and when its cancel was requested, for the operational timeouts.
  Clock::time_point assigned_at{};
  Clock::time_point cancel_requested_at{};
  // A rank that failed because its collective with `peer` failed (JobStatusUpdate.peer_rank): the
  // attempt waits until `deadline` for the peer's own report, the likely cause, and otherwise ends
  // with `reason`. In memory only (a restarted coordinator has the rank's end in rank_states and
  // ends the attempt by the other rules). `attempt` 0: none.
  struct PeerFailure {
    int64_t attempt = 0;
    int peer = 0;
    std::string reason;  // "rank R (worker W): what it said"
    Clock::time_point deadline{};
  };
  PeerFailure peer_failure;

  // The rank `worker_id` runs in the current attempt, or -1.
  int rank_of(const std::string& worker_id) const;
};

// A connected worker, or a disconnected one that still owns a job attempt (it may come back).
// A worker owns one rank of one attempt. It keeps owning it after the job ended while that rank
// still runs (another rank failed, or the job was cancelled): it was told to stop and stays busy
// until it reports its end, says it runs nothing, or dies.
struct Worker {
  std::string id;
  v1::DeviceInfo device;
  std::shared_ptr<WorkerConnection> connection;  // null while disconnected
  Clock::time_point last_seen;                   // while disconnected
  std::string job_id;                            // the attempt it owns, if any
  int64_t attempt = 0;
  int rank = 0;
  uint64_t assigned_on = 0;     // connection that received the Assignment (0: none)
  uint64_t confirmed_on = 0;    // connection whose heartbeat or status named the attempt
  uint64_t cancel_sent_on = 0;  // connection that received CancelAssignment
  bool restored = false;        // job restored at startup and the worker not seen since
  // Not known to run nothing: set from Register until a heartbeat names no attempt, and whenever
  // a heartbeat names an attempt the worker does not own. Such a worker is never idle: after a
  // coordinator restart (or a long absence) it may still be stopping a rank of a job that ended,
  // and its daemon would refuse the next job as busy, failing that job.
  bool unsettled = false;
  uint64_t idle_ticket = 0;  // Scheduler::idle_ticket() taken at Register (0: none)
  // The ended attempt a heartbeat freed this worker from (its rank had stopped): the terminal
  // status that follows is still recorded on that job. Empty job_id: none.
  std::string freed_job_id;
  int64_t freed_attempt = 0;
  int freed_rank = 0;
};

class CoordinatorState {
 public:
  CoordinatorState(CoordinatorOptions options, Store& store, CheckpointStore& checkpoints,
                   Metrics& metrics, EventHub& hub)
      : options(options),
        store(store),
        checkpoints(checkpoints),
        metrics(metrics),
        hub(hub),
        random_(std::random_device{}()) {}

  const CoordinatorOptions options;
  Store& store;
  CheckpointStore& checkpoints;
  Metrics& metrics;
  EventHub& hub;

  mutable std::mutex mu;
  // Guarded by mu.
  bool shutting_down = false;
  std::unordered_map<std::string, ActiveJob> active;      // QUEUED, ASSIGNED, RUNNING
  std::unordered_map<std::string, Worker> workers;        // connected, or owning a job
  std::unordered_map<uint64_t, std::string> connections;  // connection id → worker id
  Scheduler scheduler;
  Rendezvous rendezvous;  // namespaces of the current attempts of active gang jobs
  // QUEUED jobs backing off before their next attempt (a restart): each enters the scheduler's
  // queue at its time (JobLifecycle::start_due_restarts).
  std::unordered_map<std::string, Clock::time_point> restart_at;

  // The worker whose current connection this is, or nullptr. Requires mu.
  Worker* worker_for_locked(const WorkerConnection& connection);
  // Why `worker` may not report on (job_id, attempt), or "" if it may: it must run a rank of
  // that attempt of an active job. Requires mu.
  std::string ownership_problem_locked(const Worker* worker, const std::string& job_id,
                                       int64_t attempt) const;
  // The attempt has ended (the job ended, or was queued again to restart) but this worker still
  // runs its rank of (job_id, attempt): it was told to stop and stays busy until it reports its
  // end. Requires mu.
  bool draining_locked(const Worker& worker, const std::string& job_id, int64_t attempt) const;
  // Sends CancelAssignment for the worker's attempt, once per connection. Requires mu.
  void send_cancel_locked(Worker& worker);
  // Forgets the worker's connection (it keeps its job, if any). Requires mu.
  void disconnect_locked(Worker& worker);
  // The job the worker ran has ended: the worker owns nothing and, if connected, is idle (busy
  // while unsettled). Requires mu.
  void release_worker_locked(Worker& worker);
  // `prefix` followed by 48 random bits in hex. Requires mu.
  std::string new_id_locked(const std::string& prefix);

  // Calls `done` with OK once everything committed so far is durable, or with INTERNAL naming
  // `what` if the sync failed. Does not need mu.
  void when_durable(Done done, const std::string& what);

 private:
  std::mt19937_64 random_;  // guarded by mu
};

}  // namespace lomo::server
