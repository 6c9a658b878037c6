// The worker daemon (`lomo-worker serve`): one device, one stream to the coordinator, at most one
// job attempt at a time. It glues the Session (stream, reconnects, heartbeats), the Outbox (reports
// that survive reconnects), the JobRunner (the training child) and the worker's /metrics.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>

#include "daemon/checkpoint_fetcher.h"
#include "daemon/device_info.h"
#include "daemon/job_runner.h"
#include "daemon/outbox.h"
#include "daemon/session.h"
#include "daemon/worker_metrics.h"

namespace lomo::daemon {

struct DaemonOptions {
  std::string coordinator;  // host:port of the coordinator's gRPC endpoint
  std::string token_file;   // the worker's token (server/auth.h); "" sends none
  std::string ca_file;      // the coordinator's CA bundle; "" is plaintext
  std::string cert_file;    // this worker's certificate and key for mutual TLS; "" for none
  std::string key_file;
  Device device;
  std::string worker_id;  // stable across reconnects
  // Where gang peers reach this worker's trainer (Register.advertise_address; passed to each
  // rank's trainer).
  std::string advertise_address;
  std::filesystem::path work_dir;
  std::string metrics_listen;  // empty: no /metrics endpoint
  std::filesystem::path trainer_program;
  std::chrono::milliseconds cancel_grace{30000};
  // After SIGTERM: how long the running attempt may take to checkpoint, upload and report.
  std::chrono::milliseconds shutdown_timeout{std::chrono::minutes(10)};
  std::chrono::milliseconds connect_timeout = kWorkerConnectTimeout;  // common/reconnect.h
  // Ended attempts whose checkpoints are all committed keep their directories for debugging, the
  // newest this many; older ones are removed (remove_old_attempt_directories).
  int keep_attempts = 3;
  std::string version;
};

class Daemon : private SessionHandler, private JobRunnerListener, private ChunkChannel {
 public:
  // Throws std::runtime_error for options that cannot work (a metrics address that cannot be
  // bound, a work directory that cannot be created).
  explicit Daemon(DaemonOptions options);
  ~Daemon() override;

  // Serves until request_shutdown(); returns the process exit code (0: everything the worker had
  // to report was delivered).
  int run();
  // First call: graceful (the running attempt checkpoints, uploads and reports). Second: the
  // training child is killed and the daemon leaves as soon as its reports are sent or time is up.
  // Async-signal-unsafe: call it from a signal-handling thread.
  void request_shutdown();

  int metrics_port() const { return metrics_->port(); }

 private:
  // SessionHandler
  void on_registered(const lomo::v1::Registered& registered, uint64_t generation) override;
  void on_message(const lomo::v1::CoordinatorMessage& message) override;
  void on_disconnected(uint64_t generation, const std::string& why) override;
  lomo::v1::Heartbeat heartbeat() override;
  // JobRunnerListener
  void on_status(const lomo::v1::JobStatusUpdate& status) override;
  void on_events(const lomo::v1::JobEvents& events) override;
  void on_training_metrics(const lomo::v1::TrainingMetrics& metrics,
                           int64_t tokens_per_step) override;
  void on_eval(const lomo::v1::EvalResult& eval) override;
  void on_rank_step(const std::string& job_id, int rank,
                    const trainer_protocol::Metrics& metrics) override;
  // ChunkChannel
  uint64_t wait_connected(std::chrono::steady_clock::time_point until) override;
  uint64_t generation() override;
  bool send(lomo::v1::WorkerMessage message, uint64_t generation) override;

  void start_attempt(const lomo::v1::Assignment& assignment);  // with mutex_ held
  void reap_finished_runner();                                 // with mutex_ held
  void report(lomo::v1::JobStatusUpdate status);

  DaemonOptions options_;
  std::unique_ptr<WorkerMetrics> metrics_;
  Outbox outbox_;
  std::unique_ptr<Session> session_;
  CoordinatorCheckpointFetcher fetcher_;

  std::mutex mutex_;
  std::condition_variable changed_;
  std::unique_ptr<JobRunner> runner_;
  int shutdown_requests_ = 0;
  // Set with the first shutdown request; read on the runner's thread (which never takes mutex_).
  std::atomic<bool> draining_{false};
};

}  // namespace lomo::daemon
