// What the coordinator's process tests share: a temporary directory, the real lomo-coordinator
// binary on free loopback ports, a worker that speaks the worker protocol over a real gRPC stream,
// and a small HTTP client. Every call has a deadline, so a broken coordinator fails a test rather
// than hanging it.
#pragma once

#include <grpcpp/grpcpp.h>
#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "lomo/v1/jobs.grpc.pb.h"
#include "lomo/v1/workers.grpc.pb.h"

namespace lomo::server::testing {

using Clock = std::chrono::steady_clock;

// Now plus `seconds`, for ClientContext::set_deadline.
std::chrono::system_clock::time_point deadline_in(double seconds);
// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held
// (nodiscard: a wait whose outcome nobody checks lets a test pass on a timeout).
[[nodiscard]] bool wait_until(const std::function<bool()>& condition,
                              std::chrono::milliseconds timeout);
std::string read_file(const std::filesystem::path& path);

class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

struct ProcessOptions {
  explicit ProcessOptions(std::filesystem::path dir, double timeout_seconds = 2.0)
      : data_dir(std::move(dir)), heartbeat_timeout_seconds(timeout_seconds) {}
  std::filesystem::path data_dir;
  double heartbeat_timeout_seconds;
  int heartbeat_interval_ms = 200;
  // --reattach-window; <= 0: the heartbeat timeout (tests' workers reconnect fast). Tests of the
  // coordinator's default (common/reconnect.h) set it explicitly.
  double reattach_window_seconds = 0;
  // --init when <data_dir>/coordinator.db does not exist yet (a new deployment); a restart on an
  // existing store runs without it, as a real one does. False: never (tests of the refusal).
  bool init_when_new = true;
  std::vector<std::string> extra_args;
};

// The lomo-coordinator binary as a child process, its output in <data_dir>/../coordinator-N.log.
class CoordinatorProcess {
 public:
  // Starts it and waits (up to 20 s) for its ready file. Throws std::runtime_error with the log.
  explicit CoordinatorProcess(const ProcessOptions& options);
  ~CoordinatorProcess();  // SIGKILL if still running

  const std::string& grpc_address() const { return grpc_address_; }
  const std::string& http_host() const { return http_host_; }
  int http_port() const { return http_port_; }
  pid_t pid() const { return pid_; }
  std::string log() const { return read_file(log_path_); }

  // SIGKILL and reap.
  void kill9();
  // SIGTERM; waits up to `timeout` for the exit. Returns the exit code, or -1 if it had to be
  // killed (or died from a signal).
  int terminate(std::chrono::milliseconds timeout);

  std::shared_ptr<grpc::Channel> channel() const;
  std::unique_ptr<v1::JobService::Stub> jobs() const;

 private:
  pid_t pid_ = -1;
  std::filesystem::path log_path_;
  std::string grpc_address_;
  std::string http_host_;
  int http_port_ = 0;
};

// A worker on one WorkerService.Connect stream (sync API). A reader thread queues every
// CoordinatorMessage; the stream has a 120 s deadline.
class TestWorker {
 public:
  explicit TestWorker(std::shared_ptr<grpc::Channel> channel);
  ~TestWorker();  // cancels the stream

  // Sends Register and waits for Registered. Throws std::runtime_error if none comes in 10 s.
  // The coordinator gives the worker no job until a heartbeat says it runs nothing (a daemon
  // sends one at once).
  v1::Registered register_as(const std::string& worker_id,
                             v1::DeviceKind kind = v1::DEVICE_KIND_CPU);
  bool send(const v1::WorkerMessage& message);
  bool heartbeat(const std::string& job_id = "", int64_t attempt = 0);
  // A background thread heartbeats every `interval` with whatever set_current() said last.
  void start_heartbeats(std::chrono::milliseconds interval);
  void stop_heartbeats();
  void set_current(const std::string& job_id, int64_t attempt);

  // A terminal state also stops the heartbeats naming that attempt, as the daemon does.
  bool report(const std::string& job_id, int64_t attempt, v1::JobState state,
              const std::string& reason = "");
  // FAILED with JobStatusUpdate.permanent: a failure no new attempt can get past.
  bool report_permanent_failure(const std::string& job_id, int64_t attempt,
                                const std::string& reason);
  bool report(const v1::JobStatusUpdate& status);
  bool send_metrics(const std::string& job_id, int64_t attempt, int64_t step, double loss,
                    double tokens_per_second);
  // An EvalResult at `step`, as the trainer reports an evaluation.
  bool send_eval(const std::string& job_id, int64_t attempt, int64_t step, double loss);
  // Sends `files` (path → bytes) in chunks of `chunk_bytes`, then the commit with a manifest of
  // `files` (as the daemon does), and waits for the ack. `corrupt_path`, if set, has one byte
  // flipped in its data but not in its SHA-256. `manifest_files`, if set, is what the manifest
  // describes instead of `files` (a checkpoint corrupted before it was sent).
  std::optional<v1::CheckpointAck> upload_checkpoint(
      const std::string& job_id, int64_t attempt, int64_t step,
      const std::map<std::string, std::string>& files, size_t chunk_bytes = 1000,
      const std::string& corrupt_path = "",
      const std::optional<std::map<std::string, std::string>>& manifest_files = std::nullopt);

  // The next message from the coordinator, waiting up to `timeout`.
  std::optional<v1::CoordinatorMessage> next(std::chrono::milliseconds timeout);
  // The next message of one kind, skipping others; nullopt after `timeout`.
  std::optional<v1::CoordinatorMessage> next_of(v1::CoordinatorMessage::KindCase kind,
                                                std::chrono::milliseconds timeout);
  std::optional<v1::Assignment> next_assignment(std::chrono::milliseconds timeout);

  // Ends the stream from the worker's side (as a crashed worker would).
  void disconnect();
  // Waits until the coordinator ended the stream; its status, or nullopt after `timeout`.
  std::optional<grpc::Status> wait_closed(std::chrono::milliseconds timeout);

 private:
  void read_loop();

  std::unique_ptr<v1::WorkerService::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::WorkerMessage, v1::CoordinatorMessage>> stream_;
  std::mutex write_mu_;

  std::mutex mu_;
  std::condition_variable changed_;
  std::deque<v1::CoordinatorMessage> inbox_;
  std::optional<grpc::Status> closed_;
  std::mutex report_order_mu_;  // orders a heartbeat against a report of the attempt's end
  std::string current_job_;
  int64_t current_attempt_ = 0;
  bool heartbeating_ = false;
  std::thread reader_;
  std::thread heartbeater_;
};

struct HttpResult {
  int status = 0;  // 0: no response
  std::string body;
};

// One request with 10 s timeouts.
HttpResult http_request(const CoordinatorProcess& coordinator, const std::string& method,
                        const std::string& path, const std::string& body = "");

// A spec that validates: the job YAML schema as a Struct.
google::protobuf::Struct valid_spec(const std::string& name = "", int64_t priority = 0,
                                    const std::string& device = "cpu");
v1::SubmitJobRequest submit_request(const std::string& name = "", int64_t priority = 0,
                                    const std::string& device = "cpu");
// A valid job for a gang of `world_size` cpu workers (its batch divides evenly among them).
v1::SubmitJobRequest gang_request(const std::string& name, int64_t world_size,
                                  int64_t priority = 0);

// WorkerService.RendezvousSet / RendezvousGet with a 10 s deadline.
grpc::Status rendezvous_set(const std::shared_ptr<grpc::Channel>& channel,
                            const std::string& worker_id, const std::string& job_id,
                            int64_t attempt, const std::string& key, const std::string& value);
grpc::Status rendezvous_get(const std::shared_ptr<grpc::Channel>& channel,
                            const std::string& worker_id, const std::string& job_id,
                            int64_t attempt, const std::vector<std::string>& keys,
                            v1::RendezvousGetResponse* response);

// Unary JobService calls with a 10 s deadline.
grpc::Status submit(v1::JobService::Stub& jobs, const v1::SubmitJobRequest& request, v1::Job* job);
grpc::Status get(v1::JobService::Stub& jobs, const std::string& job_id, v1::Job* job);
grpc::Status cancel(v1::JobService::Stub& jobs, const std::string& job_id, v1::Job* job);
// Every event of a job (WatchJob without follow), oldest first.
std::vector<v1::JobEvent> all_events(v1::JobService::Stub& jobs, const std::string& job_id);
// Polls GetJob until the job reaches `state` and returns it. If `timeout` passes first, the
// test fails (naming the job, the state awaited and the last state seen) and the last job seen
// is returned, so a caller's own checks still run.
v1::Job wait_for_state(v1::JobService::Stub& jobs, const std::string& job_id, v1::JobState state,
                       std::chrono::milliseconds timeout);

}  // namespace lomo::server::testing
