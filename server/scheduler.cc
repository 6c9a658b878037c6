#include "server/scheduler.h"

namespace lomo::server {

void Scheduler::add_job(const std::string& job_id, int64_t priority, int64_t submit_order,
                        v1::DeviceKind device) {
  remove_job(job_id);
  // Negated so that the set's ascending order puts the highest priority first; INT64_MIN cannot
  // be negated, and no spec asks for it, but it must not wrap around to the top of the queue.
  const int64_t rank = priority == INT64_MIN ? INT64_MAX : -priority;
  JobKey key{rank, submit_order, job_id};
  queues_[device].insert(key);
  jobs_.emplace(job_id, std::make_pair(device, std::move(key)));
}

void Scheduler::remove_job(const std::string& job_id) {
  const auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  queues_[it->second.first].erase(it->second.second);
  jobs_.erase(it);
}

void Scheduler::add_idle_worker(const std::string& worker_id, v1::DeviceKind device) {
  const auto it = workers_.find(worker_id);
  if (it != workers_.end()) {
    if (it->second.first == device) return;
    remove_worker(worker_id);
  }
  WorkerKey key{idle_counter_++, worker_id};
  idle_[device].insert(key);
  workers_.emplace(worker_id, std::make_pair(device, std::move(key)));
}

void Scheduler::remove_worker(const std::string& worker_id) {
  const auto it = workers_.find(worker_id);
  if (it == workers_.end()) return;
  idle_[it->second.first].erase(it->second.second);
  workers_.erase(it);
}

std::optional<Placement> Scheduler::next() {
  // Device kinds never compete for a worker, so serving them in any order is fair; the best job
  // overall still goes first when several kinds have work.
  const JobKey* best = nullptr;
  v1::DeviceKind best_device = v1::DEVICE_KIND_UNSPECIFIED;
  for (const auto& [device, queue] : queues_) {
    if (queue.empty()) continue;
    const auto idle = idle_.find(device);
    if (idle == idle_.end() || idle->second.empty()) continue;
    if (best == nullptr || *queue.begin() < *best) {
      best = &*queue.begin();
      best_device = device;
    }
  }
  if (best == nullptr) return std::nullopt;
  Placement placement{std::get<2>(*best), idle_[best_device].begin()->second};
  remove_job(placement.job_id);
  remove_worker(placement.worker_id);
  return placement;
}

std::vector<std::string> Scheduler::queue_order(v1::DeviceKind device) const {
  std::vector<std::string> order;
  const auto it = queues_.find(device);
  if (it == queues_.end()) return order;
  for (const JobKey& key : it->second) order.push_back(std::get<2>(key));
  return order;
}

}  // namespace lomo::server
