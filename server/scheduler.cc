#include "server/scheduler.h"

#include "server/job_text.h"

namespace lomo::server {

namespace {

// "1 idle cpu worker", "2 idle cpu workers".
std::string workers_text(int64_t count, const std::string& adjective, v1::DeviceKind device) {
  return std::to_string(count) + " " + adjective + (adjective.empty() ? "" : " ") +
         device_kind_name(device) + (count == 1 ? " worker" : " workers");
}

std::string need_text(int64_t world_size, int64_t idle, v1::DeviceKind device) {
  return workers_text(world_size, "idle", device) + ", " + std::to_string(idle) + " idle";
}

}  // namespace

std::string wait_reason(const QueueHeads& heads, const std::string& job_id, v1::DeviceKind device,
                        int64_t world_size) {
  const auto it = heads.find(device);
  const QueueHead head = it == heads.end() ? QueueHead{} : it->second;
  if (world_size > head.connected) {
    return "needs " + workers_text(world_size, "", device) + ", " + std::to_string(head.connected) +
           " connected: waiting for more to connect (jobs behind it are served meanwhile)";
  }
  if (head.job_id.empty() || head.job_id == job_id) {
    return "waiting for " + need_text(world_size, head.idle, device);
  }
  return "waiting behind job " + head.job_id + " (priority " + std::to_string(head.priority) +
         "), which needs " + need_text(head.world_size, head.idle, device);
}

Scheduler::Scheduler() : published_(std::make_shared<const QueueHeads>()) {}

void Scheduler::add_job(const std::string& job_id, int64_t priority, int64_t submit_order,
                        v1::DeviceKind device, int64_t world_size) {
  if (jobs_.count(job_id)) {
    const QueuedJob& old = jobs_.at(job_id);
    queues_[old.device].erase(old.key);
    jobs_.erase(job_id);
  }
  // Negated so that the set's ascending order puts the highest priority first; INT64_MIN cannot
  // be negated, and no spec asks for it, but it must not wrap around to the top of the queue.
  const int64_t rank = priority == INT64_MIN ? INT64_MAX : -priority;
  JobKey key{rank, submit_order, job_id};
  queues_[device].insert(key);
  jobs_.emplace(job_id, QueuedJob{device, std::move(key), world_size < 1 ? 1 : world_size});
  publish();
}

void Scheduler::remove_job(const std::string& job_id) {
  const auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  queues_[it->second.device].erase(it->second.key);
  jobs_.erase(it);
  publish();
}

void Scheduler::add_idle_worker(const std::string& worker_id, v1::DeviceKind device) {
  add_idle_worker(worker_id, device, idle_counter_++);
}

void Scheduler::add_idle_worker(const std::string& worker_id, v1::DeviceKind device,
                                uint64_t ticket) {
  const auto it = workers_.find(worker_id);
  if (it != workers_.end() && it->second.first == device) return;
  add_busy_worker(worker_id, device);  // connected, in case it was not counted yet
  WorkerKey key{ticket, worker_id};
  idle_[device].insert(key);
  workers_.emplace(worker_id, std::make_pair(device, std::move(key)));
  publish();
}

void Scheduler::add_busy_worker(const std::string& worker_id, v1::DeviceKind device) {
  const auto connected = connected_.find(worker_id);
  if (connected != connected_.end() && connected->second == device) {
    const auto idle = workers_.find(worker_id);
    if (idle != workers_.end()) {
      idle_[idle->second.first].erase(idle->second.second);
      workers_.erase(idle);
    }
    publish();
    return;
  }
  remove_worker(worker_id);
  connected_.emplace(worker_id, device);
  ++connected_by_kind_[device];
  publish();
}

void Scheduler::remove_worker(const std::string& worker_id) {
  const auto it = workers_.find(worker_id);
  if (it != workers_.end()) {
    idle_[it->second.first].erase(it->second.second);
    workers_.erase(it);
  }
  const auto connected = connected_.find(worker_id);
  if (connected != connected_.end()) {
    --connected_by_kind_[connected->second];
    connected_.erase(connected);
  }
  publish();
}

const Scheduler::QueuedJob* Scheduler::head(v1::DeviceKind device) const {
  const auto queue = queues_.find(device);
  if (queue == queues_.end()) return nullptr;
  const int64_t connected = connected_count(device);
  // Jobs larger than the connected workers are skipped: they could not start however long the
  // others wait (see the policy in the header). With none connected, every job is (and the scan
  // is skipped: a kind without workers may have a long queue).
  if (connected == 0) return nullptr;
  for (const JobKey& key : queue->second) {
    const QueuedJob& job = jobs_.at(std::get<2>(key));
    if (job.world_size <= connected) return &job;
  }
  return nullptr;
}

int64_t Scheduler::idle_count(v1::DeviceKind device) const {
  const auto it = idle_.find(device);
  return it == idle_.end() ? 0 : static_cast<int64_t>(it->second.size());
}

int64_t Scheduler::connected_count(v1::DeviceKind device) const {
  const auto it = connected_by_kind_.find(device);
  return it == connected_by_kind_.end() ? 0 : it->second;
}

std::optional<Placement> Scheduler::next() {
  // The best startable head over all kinds: kinds never compete for a worker, so the order
  // between them only decides which is logged first.
  const QueuedJob* best = nullptr;
  for (const auto& [device, queue] : queues_) {
    const QueuedJob* candidate = head(device);
    if (candidate == nullptr || idle_count(device) < candidate->world_size) continue;
    if (best == nullptr || candidate->key < best->key) best = candidate;
  }
  if (best == nullptr) return std::nullopt;
  Placement placement;
  placement.job_id = std::get<2>(best->key);
  const v1::DeviceKind device = best->device;
  const int64_t world_size = best->world_size;
  for (const WorkerKey& key : idle_[device]) {
    if (static_cast<int64_t>(placement.workers.size()) == world_size) break;
    placement.workers.push_back(key.second);
  }
  placement.worker_id = placement.workers.front();
  remove_job(placement.job_id);
  for (const std::string& worker : placement.workers) add_busy_worker(worker, device);
  return placement;
}

std::vector<std::string> Scheduler::queue_order(v1::DeviceKind device) const {
  std::vector<std::string> order;
  const auto it = queues_.find(device);
  if (it == queues_.end()) return order;
  for (const JobKey& key : it->second) order.push_back(std::get<2>(key));
  return order;
}

std::string Scheduler::wait_reason(const std::string& job_id) const {
  const auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return "";
  return server::wait_reason(heads(), job_id, it->second.device, it->second.world_size);
}

QueueHeads Scheduler::heads() const {
  QueueHeads heads;
  for (const auto& [device, count] : connected_by_kind_) heads[device];
  for (const auto& [device, queue] : queues_) heads[device];
  for (auto& [device, entry] : heads) {
    entry.idle = idle_count(device);
    entry.connected = connected_count(device);
    if (const QueuedJob* job = head(device); job != nullptr) {
      entry.job_id = std::get<2>(job->key);
      const int64_t rank = std::get<0>(job->key);
      entry.priority = rank == INT64_MAX ? INT64_MIN : -rank;
      entry.world_size = job->world_size;
    }
  }
  return heads;
}

void Scheduler::publish() {
  auto snapshot = std::make_shared<const QueueHeads>(heads());
  std::lock_guard lock(published_mu_);
  published_ = std::move(snapshot);
}

std::shared_ptr<const QueueHeads> Scheduler::published() const {
  std::lock_guard lock(published_mu_);
  return published_;
}

}  // namespace lomo::server
