// Wakes the readers of a job's events (WatchJob streams, REST event streams) when new events are
// stored, and every reader when the coordinator shuts down. Readers then read the store: the hub
// carries no data, so a missed or duplicate wake-up costs one query, never an event.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>

namespace lomo::server {

class EventHub {
 public:
  using Callback = std::function<void()>;

  // `callback` runs (on the publishing thread, without locks held) after each publish() for
  // `job_id` and on close(); it must not block. It can run once more after unsubscribe() returns.
  // Subscribing after close() runs it at once. Returns an id for unsubscribe().
  uint64_t subscribe(const std::string& job_id, Callback callback);
  void unsubscribe(uint64_t id);
  void publish(const std::string& job_id);
  void close();
  bool closed() const;

 private:
  mutable std::mutex mu_;
  bool closed_ = false;
  uint64_t next_id_ = 1;
  std::unordered_multimap<std::string, std::pair<uint64_t, Callback>> by_job_;
  std::unordered_map<uint64_t, std::string> jobs_by_id_;
};

}  // namespace lomo::server
