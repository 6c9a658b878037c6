// What the coordinator needs from one worker stream (WorkerSession implements it over gRPC; tests
// may fake it).
#pragma once

#include <grpcpp/support/status.h>

#include <chrono>
#include <cstdint>

#include "lomo/v1/workers.pb.h"

namespace lomo::server {

class WorkerConnection {
 public:
  virtual ~WorkerConnection() = default;
  // Unique for the coordinator's lifetime; names the connection that owns an upload.
  virtual uint64_t id() const = 0;
  // Queues a message for the worker, written in order. False once the stream is closing.
  virtual bool send(const v1::CoordinatorMessage& message) = 0;
  // Ends the stream with `status` once queued messages are written. Idempotent.
  virtual void close(const grpc::Status& status) = 0;
  // When the worker last registered or heartbeated on this stream.
  virtual std::chrono::steady_clock::time_point last_heartbeat() const = 0;
};

}  // namespace lomo::server
