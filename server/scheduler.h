// Which queued job goes to which idle worker: jobs in order of priority (higher first), then
// submission (earlier first); a job only goes to a worker whose device kind it asked for; among
// idle workers of that kind, the one idle longest goes first. Pure bookkeeping, no I/O, not
// thread-safe (the coordinator calls it under its lock).
#pragma once

#include <cstdint>
#include <map>
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
  std::string worker_id;
};

class Scheduler {
 public:
  // Adds (or re-queues) a job. submit_order breaks ties between equal priorities.
  void add_job(const std::string& job_id, int64_t priority, int64_t submit_order,
               v1::DeviceKind device);
  void remove_job(const std::string& job_id);
  // Marks a worker idle (ready for a job). Calling it for a worker already idle keeps its place.
  void add_idle_worker(const std::string& worker_id, v1::DeviceKind device);
  // The worker is busy, gone, or draining.
  void remove_worker(const std::string& worker_id);

  // Pairs the best queued job with the longest-idle fitting worker and removes both; nullopt
  // when no queued job has a fitting idle worker.
  std::optional<Placement> next();

  size_t queued_jobs() const { return jobs_.size(); }
  size_t idle_workers() const { return workers_.size(); }
  // Queued job ids of one device kind in the order they will be placed (tests, diagnostics).
  std::vector<std::string> queue_order(v1::DeviceKind device) const;

 private:
  // (-priority, submit_order, id): std::set orders it as the queue should be served.
  using JobKey = std::tuple<int64_t, int64_t, std::string>;
  using WorkerKey = std::pair<uint64_t, std::string>;  // (when it became idle, id)

  std::map<v1::DeviceKind, std::set<JobKey>> queues_;
  std::unordered_map<std::string, std::pair<v1::DeviceKind, JobKey>> jobs_;
  std::map<v1::DeviceKind, std::set<WorkerKey>> idle_;
  std::unordered_map<std::string, std::pair<v1::DeviceKind, WorkerKey>> workers_;
  uint64_t idle_counter_ = 0;
};

}  // namespace lomo::server
