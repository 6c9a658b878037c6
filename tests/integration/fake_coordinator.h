// A stand-in for lomo-coordinator's worker side (lomo.v1.WorkerService) for the worker daemon's
// tests: it registers workers, records what they report, verifies checkpoint uploads the way the
// real checkpoint store does (contiguous offsets, SHA-256 per file) and acknowledges commits, and
// lets a test send assignments and cancellations.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "lomo/v1/jobs.grpc.pb.h"
#include "lomo/v1/workers.grpc.pb.h"

namespace lomo::testing {

class FakeCoordinator;

// The part of JobService a worker uses to resume a restarted job: its committed checkpoints.
class FakeJobService : public lomo::v1::JobService::Service {
 public:
  explicit FakeJobService(FakeCoordinator& coordinator) : coordinator_(coordinator) {}
  grpc::Status ListCheckpoints(grpc::ServerContext* context,
                               const lomo::v1::ListCheckpointsRequest* request,
                               lomo::v1::ListCheckpointsResponse* response) override;
  grpc::Status DownloadCheckpoint(
      grpc::ServerContext* context, const lomo::v1::DownloadCheckpointRequest* request,
      grpc::ServerWriter<lomo::v1::DownloadCheckpointResponse>* writer) override;

 private:
  FakeCoordinator& coordinator_;
};

class FakeCoordinator : public lomo::v1::WorkerService::Service {
 public:
  // Listens on 127.0.0.1:`port` (0: a free port).
  explicit FakeCoordinator(int port = 0, int64_t heartbeat_interval_ms = 200);
  ~FakeCoordinator() override;

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }
  // Ends every stream and stops listening.
  void shutdown();

  // Waits until `count` registrations have happened (reconnects count); the latest one.
  std::optional<lomo::v1::Register> wait_registered(int count, std::chrono::milliseconds timeout);
  // Sends to the worker's current stream; false if there is none.
  bool send(const lomo::v1::CoordinatorMessage& message);
  bool assign(const std::string& job_id, int64_t attempt, const google::protobuf::Struct& spec);
  bool cancel(const std::string& job_id, int64_t attempt);

  // The first status update for `job_id` in a terminal state (SUCCEEDED, FAILED, CANCELLED).
  std::optional<lomo::v1::JobStatusUpdate> wait_terminal(const std::string& job_id,
                                                         std::chrono::milliseconds timeout);
  bool wait_state(const std::string& job_id, lomo::v1::JobState state,
                  std::chrono::milliseconds timeout);
  std::vector<lomo::v1::JobStatusUpdate> statuses() const;
  std::vector<lomo::v1::JobEvent> events(const std::string& job_id) const;
  int64_t heartbeats() const;
  lomo::v1::Heartbeat last_heartbeat() const;

  // Committed checkpoints: step → (path → bytes).
  std::map<int64_t, std::map<std::string, std::string>> committed(const std::string& job_id) const;
  // Sequence of (step, committed) for every commit answered, in order.
  std::vector<std::pair<int64_t, bool>> commit_answers() const;
  // The index in statuses() at which each commit was answered (to check ordering).
  size_t statuses_before_commit(int64_t step) const;
  // The next `count` commits are rejected (answered committed=false).
  void reject_commits(int count);

  grpc::Status Connect(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<lomo::v1::CoordinatorMessage,
                                                lomo::v1::WorkerMessage>* stream) override;
  // The newest committed checkpoint of the job, to any caller (the real coordinator serves only
  // the worker that owns the attempt).
  grpc::Status FetchCheckpoint(
      grpc::ServerContext* context, const lomo::v1::FetchCheckpointRequest* request,
      grpc::ServerWriter<lomo::v1::FetchCheckpointResponse>* writer) override;
  // The latest FetchCheckpoint request, if any came.
  std::optional<lomo::v1::FetchCheckpointRequest> last_fetch() const;

 private:
  struct Upload {
    std::map<std::string, std::string> files;        // complete and verified
    std::map<std::string, std::string> in_progress;  // path → bytes so far
    std::string error;
  };
  void handle_chunk(const lomo::v1::CheckpointChunk& chunk, uint64_t connection);

  int port_ = 0;
  int64_t heartbeat_interval_ms_;
  FakeJobService job_service_{*this};
  std::unique_ptr<grpc::Server> server_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::mutex write_mutex_;
  grpc::ServerReaderWriter<lomo::v1::CoordinatorMessage, lomo::v1::WorkerMessage>* stream_ =
      nullptr;
  uint64_t connection_ = 0;
  int fetches_ = 0;
  lomo::v1::FetchCheckpointRequest last_fetch_;
  int registrations_ = 0;
  std::optional<lomo::v1::Register> last_register_;
  std::vector<lomo::v1::JobStatusUpdate> statuses_;
  std::map<std::string, std::vector<lomo::v1::JobEvent>> events_;
  int64_t heartbeats_ = 0;
  lomo::v1::Heartbeat last_heartbeat_;
  std::map<std::pair<uint64_t, std::string>, std::map<int64_t, Upload>> uploads_;
  std::map<std::string, std::map<int64_t, std::map<std::string, std::string>>> committed_;
  std::vector<std::pair<int64_t, bool>> commit_answers_;
  std::map<int64_t, size_t> statuses_at_commit_;
  int reject_commits_ = 0;
};

}  // namespace lomo::testing
