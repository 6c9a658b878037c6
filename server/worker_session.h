// WorkerService.Connect: one bidirectional stream per worker, one reactor per stream;
// WorkerService.FetchCheckpoint (stream_reactor.h's CheckpointFilesReactor); and the rendezvous
// key-value calls of a gang's ranks (RendezvousSet, RendezvousGet: unary, run on the Executor since
// they take the coordinator's lock).
//
// Reading: one read at a time. Heartbeats that repeat the previous (job, attempt) are handled on
// gRPC's thread (a timestamp); every other message goes to the Executor, and the next read starts
// when it has been handled, so messages take effect in stream order and a slow disk slows the
// worker's stream rather than the server.
// Writing: messages queue and are written one at a time; close() finishes the stream once the
// queue is written.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "lomo/v1/workers.grpc.pb.h"
#include "server/auth.h"
#include "server/coordinator.h"
#include "server/executor.h"
#include "server/in_flight.h"
#include "server/worker_connection.h"

namespace lomo::server {

class WorkerSession final
    : public grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>,
      public WorkerConnection,
      public std::enable_shared_from_this<WorkerSession> {
 public:
  // `caller`: the stream's authenticated principal; Register may use only its worker ids (when
  // authentication is on).
  WorkerSession(uint64_t id, Coordinator& coordinator, Executor& executor, InFlight& in_flight,
                Principal caller, bool check_worker_id);
  // Starts reading and keeps the session alive until OnDone.
  void start();

  uint64_t id() const override { return id_; }
  bool send(const v1::CoordinatorMessage& message) override;
  void close(const grpc::Status& status) override;
  std::chrono::steady_clock::time_point last_heartbeat() const override;

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  void handle(const v1::WorkerMessage& message);
  void read_next();
  void touch();

  const uint64_t id_;
  const Principal caller_;
  const bool check_worker_id_;
  Coordinator& coordinator_;
  Executor& executor_;
  InFlight& in_flight_;
  std::shared_ptr<WorkerSession> self_;  // the reactor's own reference, dropped in OnDone

  // Read side: touched only by the one outstanding read and the task it posts.
  v1::WorkerMessage incoming_;
  bool registered_ = false;
  bool heartbeat_seen_ = false;
  std::string heartbeat_job_;
  int64_t heartbeat_attempt_ = 0;
  std::atomic<int64_t> last_heartbeat_ns_;

  std::mutex mu_;
  std::deque<v1::CoordinatorMessage> outgoing_;  // front() is being written when writing_
  bool writing_ = false;
  bool closing_ = false;   // close() ran: send() refuses
  bool finished_ = false;  // Finish() ran: no more operations
  bool done_ = false;      // OnDone ran
  grpc::Status finish_status_;
};

class WorkerServiceImpl final : public v1::WorkerService::CallbackService {
 public:
  WorkerServiceImpl(Coordinator& coordinator, Executor& executor, InFlight& in_flight,
                    const Authenticator& auth)
      : coordinator_(coordinator), executor_(executor), in_flight_(in_flight), auth_(auth) {}

  grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>* Connect(
      grpc::CallbackServerContext* context) override;
  // The newest committed checkpoint of the job attempt the calling worker owns, as FileChunks
  // after a first message naming it (see workers.proto).
  grpc::ServerWriteReactor<v1::FetchCheckpointResponse>* FetchCheckpoint(
      grpc::CallbackServerContext* context, const v1::FetchCheckpointRequest* request) override;
  grpc::ServerUnaryReactor* RendezvousSet(grpc::CallbackServerContext* context,
                                          const v1::RendezvousSetRequest* request,
                                          v1::RendezvousSetResponse* response) override;
  grpc::ServerUnaryReactor* RendezvousGet(grpc::CallbackServerContext* context,
                                          const v1::RendezvousGetRequest* request,
                                          v1::RendezvousGetResponse* response) override;

 private:
  // The worker role, and (authentication on) `worker_id` among the caller's worker ids.
  grpc::Status authorize(const grpc::CallbackServerContext& context, const std::string& method,
                         const std::string& worker_id) const;

  Coordinator& coordinator_;
  Executor& executor_;
  InFlight& in_flight_;
  const Authenticator& auth_;
  std::atomic<uint64_t> next_connection_id_{1};
};

}  // namespace lomo::server
