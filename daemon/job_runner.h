// One job attempt on this worker, start to finish. The training runs in a child process
// (`lomo-worker train <attempt dir>/job.yaml --protocol-file <attempt dir>/protocol.jsonl`) so
// that a crash or an OOM kill is reported as the attempt's failure instead of ending the daemon.
// While it runs, its protocol records (common/trainer_protocol.h) become TrainingMetrics/EvalResult
// events and checkpoint uploads, and its output lines become LogLine events. The attempt ends with
// exactly one terminal status update, decided by the protocol's outcome record and the exit code:
// no decision reads the child's human-readable output.
//
// A rank of a gang (Assignment.world_size > 1) runs the same way with the rank flags of
// `lomo-worker train` (its peers meet through the coordinator's rendezvous of the attempt). Every
// rank fetches the committed checkpoint to resume from and reports its status and output lines;
// only rank 0 sends metrics and eval events and uploads checkpoints (the others write none).
#pragma once

#include <algorithm>
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

#include "common/child_process.h"
#include "common/trainer_protocol.h"
#include "daemon/checkpoint_uploader.h"
#include "daemon/trainer_channel.h"
#include "lomo/v1/workers.pb.h"

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
  // Every rank's own step: its wall time and the time and bytes of its collectives (a straggler
  // shows as the rank whose peers wait on it). Rank 0 also reports on_training_metrics.
  virtual void on_rank_step(const std::string& job_id, int rank,
                            const trainer_protocol::Metrics& metrics) {}
};

// What a rank of a gang (Assignment.world_size > 1) needs to meet its peers.
struct GangOptions {
  std::string coordinator;        // HOST:PORT: the rendezvous is there
  std::string worker_id;          // the id the coordinator knows this worker by
  std::string advertise_address;  // where the peers reach this worker's trainer
};

// Seeds an attempt after the first with the job's newest committed checkpoint, so that a restarted
// job resumes instead of starting over (the trainer resumes from <output.dir>/checkpoints/latest).
class CheckpointFetcher {
 public:
  virtual ~CheckpointFetcher() = default;
  // Downloads the newest committed checkpoint of `job_id` to `checkpoints_dir`/step-NNNNNNNN and
  // points `checkpoints_dir`/latest at it, for the worker running `attempt` (the coordinator
  // serves it to the attempt's owner only). Returns its step, or nullopt if the job has none.
  // Throws std::runtime_error when the coordinator cannot provide it.
  virtual std::optional<int64_t> fetch_latest(const std::string& job_id, int64_t attempt,
                                              const std::filesystem::path& checkpoints_dir) = 0;
};

struct JobRunnerOptions {
  std::filesystem::path work_dir;  // attempts live in attempt_directory() (checkpoint_layout.h)
  std::filesystem::path trainer_program;  // the lomo-worker binary (it has the train command)
  std::vector<std::string> trainer_env;   // "KEY=VALUE" for the child (CUDA_VISIBLE_DEVICES)
  std::chrono::milliseconds cancel_grace{30000};  // SIGTERM → SIGKILL after a cancel
  std::chrono::milliseconds poll_interval{200};   // the protocol file, event batching
  // After the child ends: how long its last checkpoint upload and reports may take.
  std::chrono::milliseconds finish_timeout{std::chrono::minutes(10)};
  UploaderOptions upload;
  GangOptions gang;
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
  // This worker's rank in the attempt's gang (0 for a job of its own) and the gang's size.
  int rank() const { return assignment_.world_size() > 1 ? assignment_.rank() : 0; }
  int world_size() const { return std::max(1, assignment_.world_size()); }

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
  // What the runner asked of the child so far (cancel, stop, kill) and when a cancel's grace ends.
  struct SignalsSent {
    bool term = false;
    bool kill = false;
    std::chrono::steady_clock::time_point kill_at{};
  };

  void run();
  lomo::v1::JobStatusUpdate supervise();
  // Reads the spec, makes a fresh attempt directory and writes the child's job file; a status
  // when the spec cannot run.
  std::optional<lomo::v1::JobStatusUpdate> prepare_attempt(
      const std::filesystem::path& attempt_dir);
  // A later attempt continues from the job's newest committed checkpoint.
  void seed_from_committed_checkpoint();
  std::unique_ptr<ChildProcess> start_trainer(const std::filesystem::path& attempt_dir);
  // Relays the child's output and protocol records until it has ended; its exit status.
  ExitStatus follow_trainer(ChildProcess& child, TrainerChannel& channel);
  void forward_requests(ChildProcess& child, SignalsSent& sent);
  void poll_channel(TrainerChannel& channel);
  void on_record(trainer_protocol::Record record);
  void offer_checkpoint(int64_t step);
  // The terminal status once the child has ended and its reports are relayed.
  lomo::v1::JobStatusUpdate outcome_of(const ExitStatus& exit);
  lomo::v1::JobStatusUpdate outcome_of_report(const ExitStatus& exit, bool uploaded,
                                              const std::string& upload_error);
  lomo::v1::JobStatusUpdate preempted_status() const;
  // Every checkpoint of the attempt is committed: its directory may be removed later.
  void mark_delivered() const;
  void emit(lomo::v1::JobEvent event);
  void emit_log(const std::string& text);
  void flush_events();
  void handle_output_line(const std::string& line, bool is_stderr);
  std::string failure_reason(const std::string& exit_description) const;

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
  // Set on the runner's thread before it reports: nothing of the attempt is left to upload.
  bool delivered_ = false;

  // Owned by the runner's thread.
  std::filesystem::path out_dir_;
  int64_t tokens_per_step_ = 0;
  int64_t last_offered_step_ = -1;
  std::optional<trainer_protocol::Outcome> outcome_;  // the child's last record, when it wrote one
  std::optional<std::string> protocol_error_;         // the first unreadable protocol line
  std::deque<std::string> stderr_tail_;
  std::vector<lomo::v1::JobEvent> pending_events_;
  size_t pending_event_bytes_ = 0;
  std::unique_ptr<CheckpointUploader> uploader_;

  mutable std::mutex mutex_;
  lomo::v1::JobStatusUpdate final_status_;
  std::thread thread_;
};

// In an attempt directory once the attempt has ended and every checkpoint it offered was committed
// (or it wrote none): only such directories are ever removed.
inline constexpr const char* kDeliveredMarker = "delivered";

// Keeps the `keep` attempt directories under `work_dir` delivered most recently and removes the
// other delivered ones (with their job directory once empty); an attempt still running, or one
// whose checkpoint never reached the coordinator, has no marker and stays. Returns what it
// removed; a directory that cannot be removed is logged and skipped.
std::vector<std::filesystem::path> remove_old_attempt_directories(
    const std::filesystem::path& work_dir, int keep);

// "killed by SIGKILL (out of memory?)" and the like: the words a failure reason uses for how the
// training process ended.
std::string describe_child_end(bool signaled, int code, int signal);

}  // namespace lomo::daemon
