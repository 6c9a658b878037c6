// One job attempt on this worker, start to finish. The training runs in a child process
// (`lomo-worker train <attempt dir>/job.yaml`) so that a crash or an OOM kill is reported as the
// attempt's failure instead of ending the daemon. While it runs, its output lines become LogLine
// events, its metrics.jsonl becomes TrainingMetrics/EvalResult events, and each checkpoint it
// commits is uploaded. The attempt ends with exactly one terminal status update.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "lomo/v1/workers.pb.h"
#include "daemon/checkpoint_uploader.h"

namespace lomo::daemon {

// Where a runner's reports go. Called on the runner's thread.
class JobRunnerListener {
 public:
  virtual ~JobRunnerListener() = default;
  virtual void on_status(const lomo::v1::JobStatusUpdate& status) = 0;
  virtual void on_events(const lomo::v1::JobEvents& events) = 0;
  // For the worker's own metrics; `tokens_per_step` is batch_size × max_length.
  virtual void on_training_metrics(const lomo::v1::TrainingMetrics& metrics,
                                   int64_t tokens_per_step) {}
  virtual void on_eval(const lomo::v1::EvalResult& eval) {}
};

// Seeds an attempt after the first with the job's newest committed checkpoint, so that a restarted
// job resumes instead of starting over (the trainer resumes from <output.dir>/checkpoints/latest).
class CheckpointFetcher {
 public:
  virtual ~CheckpointFetcher() = default;
  // Downloads the newest committed checkpoint of `job_id` to `checkpoints_dir`/step-NNNNNNNN and
  // points `checkpoints_dir`/latest at it. Returns its step, or nullopt if the job has none.
  // Throws std::runtime_error when the coordinator cannot provide it.
  virtual std::optional<int64_t> fetch_latest(const std::string& job_id,
                                              const std::filesystem::path& checkpoints_dir) = 0;
};

struct JobRunnerOptions {
  std::filesystem::path work_dir;         // attempts live in <work_dir>/jobs/<job id>/attempt-<n>
  std::filesystem::path trainer_program;  // the lomo-worker binary (it has the train command)
  std::vector<std::string> trainer_env;   // "KEY=VALUE" for the child (CUDA_VISIBLE_DEVICES)
  std::chrono::milliseconds cancel_grace{30000};  // SIGTERM → SIGKILL after a cancel
  std::chrono::milliseconds poll_interval{200};   // metrics.jsonl, checkpoints/latest, batching
  // After the child ends: how long its last checkpoint upload and reports may take.
  std::chrono::milliseconds finish_timeout{std::chrono::minutes(10)};
  UploaderOptions upload;
};

class JobRunner {
 public:
  // Starts the attempt on its own thread. `fetcher` may be null (no resume across workers).
  JobRunner(lomo::v1::Assignment assignment, JobRunnerOptions options, JobRunnerListener& listener,
            ChunkChannel& channel, CheckpointFetcher* fetcher);
  // Kills a child still running (SIGKILL) and waits for the thread.
  ~JobRunner();
  JobRunner(const JobRunner&) = delete;
  JobRunner& operator=(const JobRunner&) = delete;

  const std::string& job_id() const { return assignment_.job_id(); }
  int64_t attempt() const { return assignment_.attempt(); }

  // CancelAssignment: SIGTERM to the child, SIGKILL after cancel_grace; ends CANCELLED.
  void cancel();
  // The worker is shutting down: SIGTERM to the child, which finishes its step, checkpoints and
  // exits; that checkpoint is uploaded and the attempt reported before the runner finishes.
  void stop();
  // Second signal: SIGKILL the child now and give up on uploads.
  void kill();
  void on_ack(const lomo::v1::CheckpointAck& ack);

  // The terminal status has been (or is being) handed to the listener: the attempt is over and
  // join() returns at once.
  bool reported() const { return reported_.load(); }
  // The runner's thread has nothing left to do.
  bool finished() const { return finished_.load(); }
  // Waits for the runner's thread to end.
  void join();
  // The terminal status it reported (valid once reported()).
  lomo::v1::JobStatusUpdate final_status() const;

 private:
  void run();
  lomo::v1::JobStatusUpdate supervise();
  void emit(lomo::v1::JobEvent event);
  void flush_events();
  void handle_output_line(const std::string& line, bool is_stderr);
  void check_latest_checkpoint();
  std::string failure_reason(const std::string& exit_description, int signal) const;

  const lomo::v1::Assignment assignment_;
  const JobRunnerOptions options_;
  JobRunnerListener& listener_;
  ChunkChannel& channel_;
  CheckpointFetcher* fetcher_;

  std::atomic<bool> cancel_requested_{false};
  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> kill_requested_{false};
  std::atomic<bool> reported_{false};
  std::atomic<bool> finished_{false};

  // Owned by the runner's thread.
  std::filesystem::path out_dir_;
  int64_t total_steps_ = 0;
  int64_t tokens_per_step_ = 0;
  int64_t last_offered_step_ = -1;
  bool saw_stopped_line_ = false;
  std::deque<std::string> stderr_tail_;
  std::vector<lomo::v1::JobEvent> pending_events_;
  size_t pending_event_bytes_ = 0;
  std::unique_ptr<CheckpointUploader> uploader_;

  mutable std::mutex mutex_;
  lomo::v1::JobStatusUpdate final_status_;
  std::thread thread_;
};

// "killed by SIGKILL (out of memory?)" and the like: the words a failure reason uses for how the
// training process ended.
std::string describe_child_end(bool signaled, int code, int signal);

}  // namespace lomo::daemon
