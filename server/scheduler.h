// Which queued job goes to which idle workers. A job needs `world_size` workers of its device kind
// (a gang: one rank per worker) and is placed all-or-nothing: it takes world_size idle workers at
// once or none, so no job ever holds part of a gang and two gangs can never deadlock waiting for
// each other's workers. Among idle workers of a kind, the ones idle longest go first; rank 0 is
// the one idle longest.
//
// Policy: strict order per device kind. Queued jobs are ordered by priority (higher first), then
// submission (earlier first); the best queued job of a kind is served first, and while it waits
// for enough idle workers, every job behind it waits too, however small (no backfill). A gang is
// thus never starved by a stream of smaller jobs: idle workers accumulate for it. The one
// exception is a job that needs more workers of its kind than are connected at all: it could not
// start even with every worker idle, so it does not hold the queue (the jobs behind it are served)
// and waits, with that reason, until enough workers connect; it then takes its place again.
// Device kinds never compete for a worker, so each kind's queue is served independently.
//
// Pure bookkeeping, no I/O, not thread-safe (the coordinator calls it under its lock), except
// published(): a copy of what decides the wait reasons, refreshed by every change, which the
// coordinator's read path (GetJob, ListJobs, WatchJob) reads without that lock.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "lomo/v1/workers.pb.h"

namespace lomo::server {

struct Placement {
  std::string job_id;
  std::string worker_id;             // rank 0's worker (workers[0])
  std::vector<std::string> workers;  // one per rank, in rank order
};

// What decides the wait reason of every queued job of one device kind.
struct QueueHead {
  // The first queued job that could run with the connected workers ("" when none): every other
  // job that could waits behind it.
  std::string job_id;
  int64_t priority = 0;
  int64_t world_size = 0;
  int64_t idle = 0;       // idle workers of this kind
  int64_t connected = 0;  // connected workers of this kind, idle or busy
};
using QueueHeads = std::map<v1::DeviceKind, QueueHead>;

// Why a queued job (of `device`, needing `world_size` workers) waits, given its kind's head:
// "waiting for 2 idle cpu workers, 1 idle", "waiting behind job J (priority P), which needs 2
// idle cpu workers, 1 idle", or "needs 4 cpu workers, 2 connected: waiting for more to connect
// (jobs behind it are served meanwhile)".
std::string wait_reason(const QueueHeads& heads, const std::string& job_id, v1::DeviceKind device,
                        int64_t world_size);

class Scheduler {
 public:
  Scheduler();

  // Adds (or re-queues) a job. submit_order breaks ties between equal priorities; world_size >= 1
  // workers of `device` run it.
  void add_job(const std::string& job_id, int64_t priority, int64_t submit_order,
               v1::DeviceKind device, int64_t world_size = 1);
  void remove_job(const std::string& job_id);
  // Marks a connected worker idle (ready for a job). Calling it for a worker already idle keeps
  // its place. With a ticket (from idle_ticket()), it ranks as idle since the ticket was taken.
  void add_idle_worker(const std::string& worker_id, v1::DeviceKind device);
  void add_idle_worker(const std::string& worker_id, v1::DeviceKind device, uint64_t ticket);
  // A place in the idle order, taken now and used later: a worker that registers becomes idle
  // only at its first heartbeat, yet ranks by when it registered.
  uint64_t idle_ticket() { return idle_counter_++; }
  // A worker connected while it runs a job: it counts as connected, not idle.
  void add_busy_worker(const std::string& worker_id, v1::DeviceKind device);
  // The worker is gone (disconnected, draining): neither idle nor connected.
  void remove_worker(const std::string& worker_id);

  // Places the best queued job that can start now on the longest-idle workers of its kind and
  // removes them all from the queues; nullopt when no job can start.
  std::optional<Placement> next();

  size_t queued_jobs() const { return jobs_.size(); }
  size_t idle_workers() const { return workers_.size(); }
  // Queued job ids of one device kind in queue order (tests, diagnostics).
  std::vector<std::string> queue_order(v1::DeviceKind device) const;
  // Why a queued job waits (see wait_reason above); "" for a job that is not queued.
  std::string wait_reason(const std::string& job_id) const;

  // The heads as of the last change. Thread-safe: may be called without the coordinator's lock.
  std::shared_ptr<const QueueHeads> published() const;

 private:
  // (-priority, submit_order, id): std::set orders it as the queue should be served.
  using JobKey = std::tuple<int64_t, int64_t, std::string>;
  using WorkerKey = std::pair<uint64_t, std::string>;  // (when it became idle, id)
  struct QueuedJob {
    v1::DeviceKind device;
    JobKey key;
    int64_t world_size;
  };

  // The first job of `device`'s queue that could run with its connected workers, or nullptr.
  const QueuedJob* head(v1::DeviceKind device) const;
  int64_t idle_count(v1::DeviceKind device) const;
  int64_t connected_count(v1::DeviceKind device) const;
  QueueHeads heads() const;
  void publish();

  std::map<v1::DeviceKind, std::set<JobKey>> queues_;
  std::unordered_map<std::string, QueuedJob> jobs_;
  std::map<v1::DeviceKind, std::set<WorkerKey>> idle_;
  std::unordered_map<std::string, std::pair<v1::DeviceKind, WorkerKey>> workers_;
  std::unordered_map<std::string, v1::DeviceKind> connected_;  // idle or busy
  std::map<v1::DeviceKind, int64_t> connected_by_kind_;
  uint64_t idle_counter_ = 1;  // 0 is no ticket

  mutable std::mutex published_mu_;
  std::shared_ptr<const QueueHeads> published_;  // guarded by published_mu_
};

}  // namespace lomo::server
