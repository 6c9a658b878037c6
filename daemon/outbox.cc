#include "daemon/outbox.h"

#include <string>

namespace lomo::daemon {

void Outbox::push(lomo::v1::WorkerMessage message) {
  const size_t bytes = message.ByteSizeLong();
  std::lock_guard lock(mutex_);
  while (reliable_count_ > 0 && (reliable_count_ >= limits_.max_reliable_messages ||
                                 reliable_bytes_ + bytes > limits_.max_reliable_bytes)) {
    if (!drop_oldest_event_batch()) break;
  }
  queue_.push_back({std::move(message), 0, bytes});
  ++reliable_count_;
  reliable_bytes_ += bytes;
  changed_.notify_all();
}

bool Outbox::drop_oldest_event_batch() {
  for (auto it = queue_.begin(); it != queue_.end(); ++it) {
    if (it->generation == 0 && it->message.has_events()) {
      dropped_events_ += it->message.events().events_size();
      unreported_dropped_events_ += it->message.events().events_size();
      reliable_bytes_ -= it->bytes;
      --reliable_count_;
      queue_.erase(it);
      return true;
    }
  }
  return false;
}

bool Outbox::push_for_connection(lomo::v1::WorkerMessage message, uint64_t generation) {
  const size_t bytes = message.ByteSizeLong();
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] {
    return open_generation_ != generation || connection_bytes_ == 0 ||
           connection_bytes_ + bytes <= limits_.max_connection_bytes;
  });
  if (generation == 0 || open_generation_ != generation) return false;
  queue_.push_back({std::move(message), generation, bytes});
  connection_bytes_ += bytes;
  changed_.notify_all();
  return true;
}

std::optional<Outbox::Item> Outbox::pop(uint64_t generation, Clock::time_point until) {
  std::unique_lock lock(mutex_);
  while (true) {
    if (open_generation_ != generation) return std::nullopt;
    while (!queue_.empty() && queue_.front().generation != 0 &&
           queue_.front().generation != generation) {
      connection_bytes_ -= queue_.front().bytes;  // left over from an earlier connection
      queue_.pop_front();
    }
    if (!queue_.empty()) break;
    if (changed_.wait_until(lock, until) == std::cv_status::timeout && queue_.empty()) {
      return std::nullopt;
    }
  }
  Entry entry = std::move(queue_.front());
  queue_.pop_front();
  Item item{std::move(entry.message), entry.generation == 0};
  if (item.reliable) {
    --reliable_count_;
    reliable_bytes_ -= entry.bytes;
    ++reliable_in_flight_;
    if (unreported_dropped_events_ > 0 && item.message.has_events()) {
      auto* event = item.message.mutable_events()->add_events();
      event->mutable_log()->set_text(
          "lomo-worker: " + std::to_string(unreported_dropped_events_) +
          " events were dropped while the coordinator was unreachable (outbox full)");
      unreported_dropped_events_ = 0;
    }
  } else {
    connection_bytes_ -= entry.bytes;
  }
  changed_.notify_all();
  return item;
}

void Outbox::finish(Item item, bool written) {
  std::lock_guard lock(mutex_);
  if (!item.reliable) return;
  --reliable_in_flight_;
  if (!written) {
    const size_t bytes = item.message.ByteSizeLong();
    queue_.push_front({std::move(item.message), 0, bytes});
    ++reliable_count_;
    reliable_bytes_ += bytes;
  }
  changed_.notify_all();
}

void Outbox::open_connection(uint64_t generation) {
  std::lock_guard lock(mutex_);
  open_generation_ = generation;
  changed_.notify_all();
}

void Outbox::close_connection() {
  std::lock_guard lock(mutex_);
  open_generation_ = 0;
  for (auto it = queue_.begin(); it != queue_.end();) {
    if (it->generation != 0) {
      connection_bytes_ -= it->bytes;
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  changed_.notify_all();
}

bool Outbox::wait_until_delivered(Clock::time_point until) {
  std::unique_lock lock(mutex_);
  return changed_.wait_until(lock, until,
                             [&] { return reliable_count_ == 0 && reliable_in_flight_ == 0; });
}

size_t Outbox::reliable_pending() const {
  std::lock_guard lock(mutex_);
  return reliable_count_ + reliable_in_flight_;
}

int64_t Outbox::dropped_events() const {
  std::lock_guard lock(mutex_);
  return dropped_events_;
}

}  // namespace lomo::daemon
