// Messages waiting to go to the coordinator. Status updates and job events are kept across
// reconnects (a report made while the coordinator is away is delivered when it is back); heartbeats
// and checkpoint chunks belong to one connection and are dropped when it ends (an interrupted
// upload starts again from its first chunk on the next connection).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>

#include "lomo/v1/workers.pb.h"

namespace lomo::daemon {

class Outbox {
 public:
  struct Limits {
    // Reliable messages kept while disconnected; past either limit the oldest event batches are
    // dropped (counted, and reported in a log line once delivery resumes). Status updates are
    // never dropped.
    size_t max_reliable_messages = 20000;
    size_t max_reliable_bytes = 64u << 20;
    // Connection messages queued before push_for_connection blocks (backpressure for uploads).
    size_t max_connection_bytes = 8u << 20;
  };
  struct Item {
    lomo::v1::WorkerMessage message;
    bool reliable = true;
  };
  using Clock = std::chrono::steady_clock;

  Outbox() : Outbox(Limits{}) {}
  explicit Outbox(Limits limits) : limits_(limits) {}

  // A reliable message (status update, job events).
  void push(lomo::v1::WorkerMessage message);
  // A message for connection `generation` only. Blocks while too many connection bytes are
  // queued. Returns false (message dropped) if that connection is not the open one or ends first.
  bool push_for_connection(lomo::v1::WorkerMessage message, uint64_t generation);

  // The writer of connection `generation`: the next message, waiting until `until`. Returns
  // nullopt on timeout or when that connection is closed.
  std::optional<Item> pop(uint64_t generation, Clock::time_point until);
  // After writing a popped item: `written` false puts a reliable item back at the front.
  void finish(Item item, bool written);

  void open_connection(uint64_t generation);
  void close_connection();  // drops connection messages; wakes blocked pushers and writers

  // True once every reliable message has been written (none queued, none being written).
  bool wait_until_delivered(Clock::time_point until);
  size_t reliable_pending() const;
  int64_t dropped_events() const;

 private:
  struct Entry {
    lomo::v1::WorkerMessage message;
    uint64_t generation = 0;  // 0: reliable
    size_t bytes = 0;         // serialized size
  };
  bool drop_oldest_event_batch();  // with mutex_ held; false if there is none

  Limits limits_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Entry> queue_;
  uint64_t open_generation_ = 0;  // 0: no connection
  size_t reliable_count_ = 0;
  size_t reliable_bytes_ = 0;  // of reliable messages queued (not in flight)
  size_t connection_bytes_ = 0;
  size_t reliable_in_flight_ = 0;
  int64_t dropped_events_ = 0;
  int64_t unreported_dropped_events_ = 0;
};

}  // namespace lomo::daemon
