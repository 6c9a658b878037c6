// The worker's one stream to the coordinator (WorkerService.Connect): dial, Register, wait for
// Registered, then heartbeat at the interval it names while a writer thread drains the Outbox and
// this thread reads CoordinatorMessages. When the stream breaks it dials again with exponential
// backoff and jitter, for as long as the worker runs.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/reconnect.h"
#include "daemon/outbox.h"
#include "lomo/v1/workers.grpc.pb.h"

namespace lomo::daemon {

// Called on the session's threads; implementations must not block for long.
class SessionHandler {
 public:
  virtual ~SessionHandler() = default;
  // A new connection is registered. `generation` numbers connections from 1.
  virtual void on_registered(const lomo::v1::Registered& registered, uint64_t generation) = 0;
  virtual void on_message(const lomo::v1::CoordinatorMessage& message) = 0;
  // The connection `generation` ended (`why`: the gRPC status, or what failed).
  virtual void on_disconnected(uint64_t generation, const std::string& why) = 0;
  // What the next heartbeat carries (the job attempt running now, if any).
  virtual lomo::v1::Heartbeat heartbeat() = 0;
};

struct SessionOptions {
  std::string address;  // host:port
  lomo::v1::Register registration;
  // Dialling plus the Register/Registered exchange must finish within this. The defaults are
  // common/reconnect.h's: the coordinator's re-attach window is derived from them.
  std::chrono::milliseconds connect_timeout = kWorkerConnectTimeout;
  std::chrono::milliseconds initial_backoff = kWorkerInitialBackoff;
  std::chrono::milliseconds max_backoff = kWorkerMaxBackoff;
  // Used until Registered names one (and when it names none).
  std::chrono::milliseconds default_heartbeat_interval{5000};
  // A stream ending this soon after registering does not reset the backoff: a coordinator that
  // accepts and then drops every stream is not dialled in a tight loop.
  std::chrono::milliseconds stable_after{10000};
};

class Session {
 public:
  Session(SessionOptions options, SessionHandler& handler, Outbox& outbox);
  ~Session();  // stop()
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  void start();
  // Delivers what the outbox holds (waiting for a connection if there is none), half-closes the
  // stream and waits for the coordinator to end it, all before `deadline`; then stops for good.
  // Returns false if reliable messages were left undelivered.
  bool shutdown(std::chrono::steady_clock::time_point deadline);
  // Stops at once: the stream is cancelled, nothing more is sent.
  void stop();

  bool connected() const { return generation_.load() != 0; }
  // The open connection's generation, or 0.
  uint64_t generation() const { return generation_.load(); }
  // Waits until a connection is open (returns its generation) or `until` passes (returns 0).
  uint64_t wait_connected(std::chrono::steady_clock::time_point until) const;
  // The id the coordinator knows this worker by (its Registered answer wins over ours).
  std::string worker_id() const;

 private:
  using Stream = grpc::ClientReaderWriter<lomo::v1::WorkerMessage, lomo::v1::CoordinatorMessage>;

  void run();
  // One connection from dial to end; returns true if it registered.
  bool run_connection(std::chrono::steady_clock::time_point* registered_at);
  // The steps of one connection: the channel is up (false: stopped or past `deadline`); Register
  // answered by Registered (false: the stream is finished); then messages until the stream ends.
  bool wait_for_channel(grpc::Channel& channel, std::chrono::steady_clock::time_point deadline);
  bool register_on(Stream& stream, grpc::ClientContext& context,
                   std::chrono::steady_clock::time_point deadline,
                   lomo::v1::CoordinatorMessage* first);
  void serve_connection(Stream& stream, grpc::ClientContext& context,
                        const lomo::v1::Registered& registered,
                        std::chrono::steady_clock::time_point* registered_at);
  void write_loop(Stream* stream, grpc::ClientContext* context, uint64_t generation,
                  std::chrono::milliseconds heartbeat_interval);
  void log(const std::string& line) const;
  // Nothing left to do: stop() was called, or shutdown() with every report delivered.
  bool finished_locked() const;

  SessionOptions options_;
  SessionHandler& handler_;
  Outbox& outbox_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<lomo::v1::WorkerService::Stub> stub_;
  std::string worker_id_;

  std::thread thread_;
  mutable std::mutex mutex_;
  mutable std::condition_variable changed_;
  std::atomic<uint64_t> generation_{0};
  uint64_t next_generation_ = 1;
  bool stopping_ = false;      // stop(): no more connections, cancel the current one
  bool half_closing_ = false;  // shutdown(): the writer half-closes once the outbox is empty
  grpc::ClientContext* context_ = nullptr;  // the current stream's, for cancelling
};

}  // namespace lomo::daemon
