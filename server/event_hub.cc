#include "server/event_hub.h"

#include <vector>

namespace lomo::server {

uint64_t EventHub::subscribe(const std::string& job_id, Callback callback) {
  std::unique_lock lock(mu_);
  const uint64_t id = next_id_++;
  if (closed_) {
    lock.unlock();
    callback();
    return id;
  }
  by_job_.emplace(job_id, std::make_pair(id, std::move(callback)));
  jobs_by_id_.emplace(id, job_id);
  return id;
}

void EventHub::unsubscribe(uint64_t id) {
  std::lock_guard lock(mu_);
  const auto job = jobs_by_id_.find(id);
  if (job == jobs_by_id_.end()) return;
  auto [begin, end] = by_job_.equal_range(job->second);
  for (auto it = begin; it != end; ++it) {
    if (it->second.first == id) {
      by_job_.erase(it);
      break;
    }
  }
  jobs_by_id_.erase(job);
}

void EventHub::publish(const std::string& job_id) {
  std::vector<Callback> callbacks;
  {
    std::lock_guard lock(mu_);
    auto [begin, end] = by_job_.equal_range(job_id);
    for (auto it = begin; it != end; ++it) callbacks.push_back(it->second.second);
  }
  for (const Callback& callback : callbacks) callback();
}

void EventHub::close() {
  std::vector<Callback> callbacks;
  {
    std::lock_guard lock(mu_);
    closed_ = true;
    for (auto& [job, entry] : by_job_) callbacks.push_back(entry.second);
  }
  for (const Callback& callback : callbacks) callback();
}

bool EventHub::closed() const {
  std::lock_guard lock(mu_);
  return closed_;
}

}  // namespace lomo::server
