#include "daemon/job_runner.h"

#include <google/protobuf/util/time_util.h>
#include <poll.h>
#include <signal.h>

#include <fstream>
#include <regex>

#include "common/child_process.h"
#include "daemon/assignment_spec.h"
#include "daemon/log.h"
#include "daemon/metrics_tail.h"

namespace lomo::daemon {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr size_t kStderrTailLines = 8;
// One JobEvents message stays far below gRPC's default 4 MiB receive limit: a message the
// coordinator refuses would come back on every reconnect.
constexpr size_t kEventsPerMessage = 256;
constexpr size_t kEventBytesPerMessage = 1u << 20;
constexpr size_t kMaxLineBytes = 16u << 10;  // longer output lines arrive in pieces

lomo::v1::JobStatusUpdate status_update(const lomo::v1::Assignment& a, lomo::v1::JobState state,
                                        const std::string& reason) {
  lomo::v1::JobStatusUpdate s;
  s.set_job_id(a.job_id());
  s.set_attempt(a.attempt());
  s.set_state(state);
  s.set_reason(reason);
  return s;
}

// The step of a checkpoint directory named step-NNNNNNNN, or -1.
int64_t step_of(const std::string& name) {
  if (name.rfind("step-", 0) != 0 || name.size() == 5) return -1;
  const std::string digits = name.substr(5);
  if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 18) return -1;
  return std::stoll(digits);
}

}  // namespace

std::string describe_child_end(bool signaled, int code, int signal) {
  if (!signaled) return "exited with code " + std::to_string(code);
  std::string text = "killed by " + signal_name(signal);
  if (signal == SIGKILL) text += " (out of memory?)";
  if (signal == SIGSEGV || signal == SIGBUS || signal == SIGILL || signal == SIGFPE) {
    text += " (crashed)";
  }
  if (signal == SIGABRT) text += " (aborted)";
  return text;
}

JobRunner::JobRunner(lomo::v1::Assignment assignment, JobRunnerOptions options,
                     JobRunnerListener& listener, ChunkChannel& channel, CheckpointFetcher* fetcher)
    : assignment_(std::move(assignment)),
      options_(std::move(options)),
      listener_(listener),
      channel_(channel),
      fetcher_(fetcher),
      uploader_(std::make_unique<CheckpointUploader>(assignment_.job_id(), assignment_.attempt(),
                                                     channel_, options_.upload)) {
  thread_ = std::thread([this] { run(); });
}

JobRunner::~JobRunner() {
  if (!finished_) kill();
  join();
}

void JobRunner::join() {
  if (thread_.joinable()) thread_.join();
}

void JobRunner::cancel() { cancel_requested_ = true; }
void JobRunner::stop() { stop_requested_ = true; }
void JobRunner::kill() {
  kill_requested_ = true;
  uploader_->abandon();
}

void JobRunner::on_ack(const lomo::v1::CheckpointAck& ack) { uploader_->on_ack(ack); }

lomo::v1::JobStatusUpdate JobRunner::final_status() const {
  std::lock_guard lock(mutex_);
  return final_status_;
}

void JobRunner::run() {
  lomo::v1::JobStatusUpdate status;
  try {
    status = supervise();
  } catch (const std::exception& e) {
    status = status_update(assignment_, lomo::v1::JOB_STATE_FAILED,
                           std::string("worker error: ") + e.what());
  }
  flush_events();
  uploader_->abandon();
  log_line("job " + job_id() + " attempt " + std::to_string(attempt()) + " ended " +
           lomo::v1::JobState_Name(status.state()) +
           (status.reason().empty() ? "" : ": " + status.reason()));
  {
    std::lock_guard lock(mutex_);
    final_status_ = status;
  }
  // From here the attempt is over for the daemon: the coordinator may assign the next job as soon
  // as it reads this status, and that assignment must not find the worker busy.
  reported_ = true;
  listener_.on_status(status);
  finished_ = true;
}

void JobRunner::emit(lomo::v1::JobEvent event) {
  *event.mutable_time() = google::protobuf::util::TimeUtil::GetCurrentTime();
  pending_event_bytes_ += event.ByteSizeLong();
  pending_events_.push_back(std::move(event));
  if (pending_events_.size() >= kEventsPerMessage ||
      pending_event_bytes_ >= kEventBytesPerMessage) {
    flush_events();
  }
}

void JobRunner::flush_events() {
  if (pending_events_.empty()) return;
  lomo::v1::JobEvents batch;
  batch.set_job_id(job_id());
  batch.set_attempt(attempt());
  for (auto& e : pending_events_) *batch.add_events() = std::move(e);
  pending_events_.clear();
  pending_event_bytes_ = 0;
  listener_.on_events(batch);
}

void JobRunner::handle_output_line(const std::string& line, bool is_stderr) {
  if (is_stderr) {
    if (!line.empty()) stderr_tail_.push_back(line);
    if (stderr_tail_.size() > kStderrTailLines) stderr_tail_.pop_front();
  } else {
    if (line.rfind("stopped at step", 0) == 0) saw_stopped_line_ = true;
    // "step     12/150  loss ...": the total when the spec gives epochs rather than steps.
    static const std::regex progress(R"(^step\s+\d+/(\d+)\s)");
    std::smatch match;
    if (total_steps_ == 0 && std::regex_search(line, match, progress)) {
      total_steps_ = std::stoll(match[1].str());
    }
  }
  lomo::v1::JobEvent event;
  event.mutable_log()->set_text(line);
  emit(std::move(event));
}

void JobRunner::check_latest_checkpoint() {
  const fs::path checkpoints = out_dir_ / "checkpoints";
  std::ifstream in(checkpoints / "latest");
  std::string name;
  if (!in || !std::getline(in, name)) return;
  const int64_t step = step_of(name);
  if (step <= last_offered_step_ || !fs::is_directory(checkpoints / name)) return;
  last_offered_step_ = step;
  uploader_->offer(step, checkpoints / name);
}

std::string JobRunner::failure_reason(const std::string& how, int signal) const {
  std::string reason = "training process " + how;
  if (!stderr_tail_.empty()) {
    reason += ": ";
    // The child's last word ("lomo-worker train: <error>") is what matters most; earlier lines
    // give context.
    bool first = true;
    for (const std::string& line : stderr_tail_) {
      reason += (first ? "" : "\n") + line;
      first = false;
    }
  }
  return reason;
}

lomo::v1::JobStatusUpdate JobRunner::supervise() {
  using lomo::v1::JobState;
  const fs::path attempt_dir = attempt_directory(options_.work_dir, job_id(), attempt());
  out_dir_ = attempt_dir / "out";
  const std::string source = "job " + job_id() + " spec";

  JobSpec spec;
  try {
    spec = spec_from_struct(assignment_.spec(), source);
  } catch (const JobSpecError& e) {
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED, e.what());
  }
  spec.output.dir = out_dir_.string();
  total_steps_ = spec.training.steps.value_or(0);
  tokens_per_step_ = spec.training.batch_size * spec.data.max_length;

  // A fresh attempt directory: leftovers of an earlier run of this attempt number would make the
  // trainer resume from a checkpoint the coordinator never committed.
  fs::remove_all(attempt_dir);
  fs::create_directories(out_dir_);
  const fs::path job_file = attempt_dir / "job.yaml";
  {
    std::ofstream out(job_file);
    out << job_spec_to_yaml(spec);
    if (!out.flush()) throw std::runtime_error("cannot write " + job_file.string());
  }
  // A first attempt has nothing to resume; a later one continues from the job's newest committed
  // checkpoint, wherever the earlier attempt ran.
  if (fetcher_ != nullptr && attempt() > 1) {
    try {
      if (auto step = fetcher_->fetch_latest(job_id(), out_dir_ / "checkpoints")) {
        last_offered_step_ = *step;
        lomo::v1::JobEvent event;
        event.mutable_log()->set_text(
            "lomo-worker: resuming from the job's committed checkpoint at step " +
            std::to_string(*step));
        emit(std::move(event));
      }
    } catch (const std::exception& e) {
      lomo::v1::JobEvent event;
      event.mutable_log()->set_text(std::string("lomo-worker: cannot fetch the job's last "
                                                "checkpoint, starting from the model: ") +
                                    e.what());
      emit(std::move(event));
    }
  }

  ChildOptions child_options;
  child_options.argv = {options_.trainer_program.string(), "train", job_file.string()};
  child_options.env = options_.trainer_env;
  child_options.stdout_mode = ChildOutput::kPipe;
  child_options.stderr_mode = ChildOutput::kPipe;
  child_options.parent_death_signal = SIGKILL;
  std::unique_ptr<ChildProcess> child;
  try {
    child = std::make_unique<ChildProcess>(child_options);
  } catch (const std::exception& e) {
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED, e.what());
  }
  log_line("job " + job_id() + " attempt " + std::to_string(attempt()) + ": training in pid " +
           std::to_string(child->pid()) + ", files in " + attempt_dir.string());
  listener_.on_status(status_update(assignment_, lomo::v1::JOB_STATE_RUNNING, ""));

  MetricsTail metrics(out_dir_ / "metrics.jsonl");
  auto poll_metrics = [&] {
    for (lomo::v1::JobEvent& event : metrics.poll(total_steps_)) {
      if (event.has_metrics()) listener_.on_training_metrics(event.metrics(), tokens_per_step_);
      if (event.has_eval()) listener_.on_eval(event.eval());
      emit(std::move(event));
    }
  };
  LineSplitter out_lines(kMaxLineBytes), err_lines(kMaxLineBytes);
  auto on_out = [&](const std::string& line) { handle_output_line(line, false); };
  auto on_err = [&](const std::string& line) { handle_output_line(line, true); };

  bool sent_term = false;
  bool sent_kill = false;
  Clock::time_point kill_at{};
  std::optional<ExitStatus> exit;
  Clock::time_point exited_at{};
  auto last_tick = Clock::now();
  while (true) {
    pollfd fds[2];
    nfds_t count = 0;
    if (child->stdout_fd() >= 0) fds[count++] = {child->stdout_fd(), POLLIN, 0};
    if (child->stderr_fd() >= 0) fds[count++] = {child->stderr_fd(), POLLIN, 0};
    ::poll(fds, count, static_cast<int>(options_.poll_interval.count()));
    if (child->stdout_fd() >= 0 && !drain_lines(child->stdout_fd(), out_lines, on_out)) {
      child->close_stdout();
    }
    if (child->stderr_fd() >= 0 && !drain_lines(child->stderr_fd(), err_lines, on_err)) {
      child->close_stderr();
    }

    if (kill_requested_ && !sent_kill) {
      child->send_signal(SIGKILL);
      sent_kill = true;
    } else if ((cancel_requested_ || stop_requested_) && !sent_term) {
      child->send_signal(SIGTERM);
      sent_term = true;
      if (cancel_requested_) kill_at = Clock::now() + options_.cancel_grace;
    }
    if (cancel_requested_ && sent_term && !sent_kill && kill_at == Clock::time_point{}) {
      kill_at = Clock::now() + options_.cancel_grace;  // a cancel after a stop
    }
    if (!sent_kill && kill_at != Clock::time_point{} && Clock::now() >= kill_at) {
      log_line("job " + job_id() +
               ": the training process did not stop within the grace period; "
               "sending SIGKILL");
      child->send_signal(SIGKILL);
      sent_kill = true;
    }

    if (Clock::now() - last_tick >= options_.poll_interval) {
      last_tick = Clock::now();
      poll_metrics();
      check_latest_checkpoint();
      flush_events();
    }
    if (!exit) {
      exit = child->try_wait();
      if (exit) exited_at = Clock::now();
    }
    // Done once it has exited and both pipes reached end of file (a grandchild holding them
    // open cannot keep the attempt alive: the pipes get two more poll intervals at most).
    if (exit && ((child->stdout_fd() < 0 && child->stderr_fd() < 0) ||
                 Clock::now() - exited_at >= 2 * options_.poll_interval)) {
      break;
    }
  }
  out_lines.finish(on_out);
  err_lines.finish(on_err);
  poll_metrics();
  check_latest_checkpoint();
  flush_events();

  const std::string how = describe_child_end(exit->signaled, exit->code, exit->signal);
  if (cancel_requested_) {
    uploader_->abandon();
    return status_update(assignment_, lomo::v1::JOB_STATE_CANCELLED, "cancelled");
  }
  if (kill_requested_) {
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED,
                         "the worker was stopped at once (second signal); training process " + how);
  }

  // Whatever the outcome, the newest checkpoint goes up first: a retry resumes from it.
  std::string upload_error;
  const auto upload = uploader_->wait_idle(Clock::now() + options_.finish_timeout, &upload_error);
  if (upload == CheckpointUploader::Outcome::kTimedOut) {
    upload_error = "the upload of the last checkpoint did not finish within " +
                   std::to_string(options_.finish_timeout.count() / 1000) + "s";
  }
  const bool uploaded = upload == CheckpointUploader::Outcome::kDone;

  if (!exit->success()) {
    std::string reason = failure_reason(how, exit->signal);
    if (!uploaded) reason += "\n(also: " + upload_error + ")";
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED, reason);
  }
  if (!uploaded) {
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED,
                         "training finished but " + upload_error);
  }
  if (stop_requested_ && saw_stopped_line_) {
    const int64_t step = uploader_->last_committed_step();
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED,
                         "interrupted: the worker was shut down; training stopped at step " +
                             std::to_string(step) + " of " + std::to_string(total_steps_) +
                             " and its checkpoint is on the coordinator");
  }
  return status_update(assignment_, lomo::v1::JOB_STATE_SUCCEEDED, "");
}

}  // namespace lomo::daemon
