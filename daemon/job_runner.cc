#include "daemon/job_runner.h"

#include <google/protobuf/util/time_util.h>
#include <poll.h>
#include <signal.h>

#include <fstream>

#include "common/checkpoint_layout.h"
#include "common/child_process.h"
#include "common/log.h"
#include "common/printable.h"
#include "daemon/assignment_spec.h"

namespace lomo::daemon {
namespace {

namespace fs = std::filesystem;
namespace protocol = trainer_protocol;
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

}  // namespace

std::vector<fs::path> remove_old_attempt_directories(const fs::path& work_dir, int keep) {
  // (when it was marked, directory) of every delivered attempt; the others are never touched.
  std::vector<std::pair<fs::file_time_type, fs::path>> delivered;
  std::error_code error;
  for (const auto& job : fs::directory_iterator(work_dir / "jobs", error)) {
    if (!job.is_directory()) continue;
    for (const auto& attempt : fs::directory_iterator(job.path(), error)) {
      const fs::path marker = attempt.path() / kDeliveredMarker;
      const auto marked = fs::last_write_time(marker, error);
      if (!error) delivered.emplace_back(marked, attempt.path());
    }
  }
  std::sort(delivered.begin(), delivered.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second > b.second;  // newest first
  });
  std::vector<fs::path> removed;
  for (size_t i = static_cast<size_t>(std::max(keep, 0)); i < delivered.size(); ++i) {
    const fs::path& dir = delivered[i].second;
    if (fs::remove_all(dir, error) == static_cast<std::uintmax_t>(-1) || error) {
      log_line("cannot remove old attempt directory " + dir.string() + ": " + error.message());
      continue;
    }
    removed.push_back(dir);
    fs::remove(dir.parent_path(), error);  // the job's directory, once it holds no attempt
  }
  return removed;
}

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
  if (delivered_) mark_delivered();
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

void JobRunner::mark_delivered() const {
  const fs::path dir = attempt_directory(options_.work_dir, job_id(), attempt());
  if (!fs::is_directory(dir)) return;
  std::ofstream(dir / kDeliveredMarker) << "every checkpoint of this attempt is committed\n";
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

void JobRunner::emit_log(const std::string& text) {
  lomo::v1::JobEvent event;
  event.mutable_log()->set_text(text);
  emit(std::move(event));
}

// Output lines are for people: they become log events and the words of a failure reason, and
// nothing is decided from them.
void JobRunner::handle_output_line(const std::string& raw_line, bool is_stderr) {
  // Protobuf strings must be UTF-8 (gRPC would drop the event, and the stream with it).
  const std::string line = valid_utf8(raw_line);
  if (is_stderr) {
    if (!line.empty()) stderr_tail_.push_back(line);
    if (stderr_tail_.size() > kStderrTailLines) stderr_tail_.pop_front();
  }
  emit_log(line);
}

void JobRunner::offer_checkpoint(int64_t step) {
  // The trainer's output.dir is out_dir_, so its checkpoint is where the layout puts it; a record
  // naming another directory is never uploaded.
  const fs::path dir = checkpoint_directory(checkpoints_directory(out_dir_), step);
  if (step <= last_offered_step_ || !fs::is_directory(dir)) return;
  last_offered_step_ = step;
  uploader_->offer(step, dir);
}

void JobRunner::on_record(protocol::Record record) {
  // A "started" record needs nothing here: each metrics record carries the total itself. In a
  // gang, rank 0 speaks for the job (its loss and tokens are global, it alone checkpoints); the
  // other ranks' metrics stay on this worker's /metrics, and their eval records (the same numbers
  // as rank 0's) are not sent.
  const bool speaks_for_job = rank() == 0;
  if (const auto* metrics = std::get_if<protocol::Metrics>(&record)) {
    listener_.on_rank_step(job_id(), rank(), *metrics);
    if (!speaks_for_job) return;
    lomo::v1::JobEvent event = metrics_event(*metrics);
    listener_.on_training_metrics(event.metrics(), tokens_per_step_);
    emit(std::move(event));
  } else if (const auto* eval = std::get_if<protocol::Eval>(&record)) {
    if (!speaks_for_job) return;
    lomo::v1::JobEvent event = eval_event(*eval);
    listener_.on_eval(event.eval());
    emit(std::move(event));
  } else if (const auto* checkpoint = std::get_if<protocol::Checkpoint>(&record)) {
    if (speaks_for_job) offer_checkpoint(checkpoint->step);
  } else if (const auto* outcome = std::get_if<protocol::Outcome>(&record)) {
    outcome_ = *outcome;
  }
}

void JobRunner::poll_channel(TrainerChannel& channel) {
  // Each bad line throws once and is consumed; read on until a read goes through, so that the
  // records after a bad line (a committed checkpoint, say) are not left behind: after the child
  // has exited there is no later read. Every line is consumed at most once, so this ends.
  constexpr int kLoggedErrors = 10;
  for (int errors = 0;; ++errors) {
    try {
      channel.poll([this](protocol::Record record) { on_record(std::move(record)); });
      return;
    } catch (const protocol::ProtocolError& e) {
      // A child that does not speak this protocol cannot be believed about its outcome.
      if (!protocol_error_) protocol_error_ = e.what();
      if (errors < kLoggedErrors) emit_log(std::string("lomo-worker: ") + e.what());
    }
  }
}

std::string JobRunner::failure_reason(const std::string& how) const {
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
  } else if (outcome_ && !outcome_->reason.empty()) {
    reason += ": " + outcome_->reason;
  }
  return reason;
}

std::optional<lomo::v1::JobStatusUpdate> JobRunner::prepare_attempt(const fs::path& attempt_dir) {
  out_dir_ = attempt_output_directory(attempt_dir);
  JobSpec spec;
  try {
    spec = spec_from_assignment(assignment_, "job " + job_id() + " spec");
  } catch (const JobSpecError& e) {
    lomo::v1::JobStatusUpdate refused =
        status_update(assignment_, lomo::v1::JOB_STATE_FAILED, e.what());
    refused.set_permanent(true);  // the same spec fails the same way on any worker
    delivered_ = true;            // nothing was written
    return refused;
  }
  spec.output.dir = out_dir_.string();
  tokens_per_step_ = spec.training.batch_size * spec.data.max_length;

  // A fresh attempt directory: leftovers of an earlier run of this attempt number would make the
  // trainer resume from a checkpoint the coordinator never committed.
  fs::remove_all(attempt_dir);
  fs::create_directories(out_dir_);
  const fs::path job_file = attempt_job_file(attempt_dir);
  std::ofstream out(job_file);
  out << job_spec_to_yaml(spec);
  if (!out.flush()) throw std::runtime_error("cannot write " + job_file.string());
  return std::nullopt;
}

void JobRunner::seed_from_committed_checkpoint() {
  // A first attempt has nothing to resume; a later one continues from the job's newest committed
  // checkpoint, wherever the earlier attempt ran.
  if (fetcher_ == nullptr || attempt() <= 1) return;
  try {
    if (auto step = fetcher_->fetch_latest(job_id(), attempt(), checkpoints_directory(out_dir_))) {
      last_offered_step_ = *step;
      emit_log("lomo-worker: resuming from the job's committed checkpoint at step " +
               std::to_string(*step));
    }
  } catch (const std::exception& e) {
    emit_log(std::string("lomo-worker: cannot fetch the job's last checkpoint, starting from the "
                         "model: ") +
             e.what());
  }
}

std::unique_ptr<ChildProcess> JobRunner::start_trainer(const fs::path& attempt_dir) {
  ChildOptions child_options;
  child_options.argv = {options_.trainer_program.string(), "train",
                        attempt_job_file(attempt_dir).string(), "--protocol-file",
                        attempt_protocol_file(attempt_dir).string()};
  if (world_size() > 1) {
    const GangOptions& gang = options_.gang;
    child_options.argv.insert(
        child_options.argv.end(),
        {"--rank", std::to_string(rank()), "--world-size", std::to_string(world_size()),
         "--rendezvous", "coordinator://" + gang.coordinator, "--worker-id", gang.worker_id,
         "--job-id", job_id(), "--attempt", std::to_string(attempt())});
    if (!gang.advertise_address.empty()) {
      child_options.argv.insert(child_options.argv.end(),
                                {"--advertise-address", gang.advertise_address});
    }
  }
  child_options.env = options_.trainer_env;
  child_options.stdout_mode = ChildOutput::kPipe;
  child_options.stderr_mode = ChildOutput::kPipe;
  child_options.parent_death_signal = SIGKILL;
  auto child = std::make_unique<ChildProcess>(child_options);
  log_line("job " + job_id() + " attempt " + std::to_string(attempt()) + ": training in pid " +
           std::to_string(child->pid()) + ", files in " + attempt_dir.string());
  return child;
}

void JobRunner::forward_requests(ChildProcess& child, SignalsSent& sent) {
  if (kill_requested_ && !sent.kill) {
    child.send_signal(SIGKILL);
    sent.kill = true;
  } else if ((cancel_requested_ || stop_requested_) && !sent.term) {
    child.send_signal(SIGTERM);
    sent.term = true;
    if (cancel_requested_) sent.kill_at = Clock::now() + options_.cancel_grace;
  }
  if (cancel_requested_ && sent.term && !sent.kill && sent.kill_at == Clock::time_point{}) {
    sent.kill_at = Clock::now() + options_.cancel_grace;  // a cancel after a stop
  }
  if (!sent.kill && sent.kill_at != Clock::time_point{} && Clock::now() >= sent.kill_at) {
    log_line("job " + job_id() +
             ": the training process did not stop within the grace period; sending SIGKILL");
    child.send_signal(SIGKILL);
    sent.kill = true;
  }
}

ExitStatus JobRunner::follow_trainer(ChildProcess& child, TrainerChannel& channel) {
  LineSplitter out_lines(kMaxLineBytes), err_lines(kMaxLineBytes);
  auto on_out = [&](const std::string& line) { handle_output_line(line, false); };
  auto on_err = [&](const std::string& line) { handle_output_line(line, true); };
  SignalsSent sent;
  std::optional<ExitStatus> exit;
  Clock::time_point exited_at{};
  auto last_tick = Clock::now();
  while (true) {
    pollfd fds[2];
    nfds_t count = 0;
    if (child.stdout_fd() >= 0) fds[count++] = {child.stdout_fd(), POLLIN, 0};
    if (child.stderr_fd() >= 0) fds[count++] = {child.stderr_fd(), POLLIN, 0};
    ::poll(fds, count, static_cast<int>(options_.poll_interval.count()));
    if (child.stdout_fd() >= 0 && !drain_lines(child.stdout_fd(), out_lines, on_out)) {
      child.close_stdout();
    }
    if (child.stderr_fd() >= 0 && !drain_lines(child.stderr_fd(), err_lines, on_err)) {
      child.close_stderr();
    }
    forward_requests(child, sent);
    if (Clock::now() - last_tick >= options_.poll_interval) {
      last_tick = Clock::now();
      poll_channel(channel);
      flush_events();
    }
    if (!exit) {
      exit = child.try_wait();
      if (exit) exited_at = Clock::now();
    }
    // Done once it has exited and both pipes reached end of file (a grandchild holding them
    // open cannot keep the attempt alive: the pipes get two more poll intervals at most).
    if (exit && ((child.stdout_fd() < 0 && child.stderr_fd() < 0) ||
                 Clock::now() - exited_at >= 2 * options_.poll_interval)) {
      break;
    }
  }
  out_lines.finish(on_out);
  err_lines.finish(on_err);
  poll_channel(channel);  // the file is complete now that the child has exited
  flush_events();
  return *exit;
}

lomo::v1::JobStatusUpdate JobRunner::supervise() {
  const fs::path attempt_dir = attempt_directory(options_.work_dir, job_id(), attempt());
  if (auto refused = prepare_attempt(attempt_dir)) return *refused;
  seed_from_committed_checkpoint();
  std::unique_ptr<ChildProcess> child;
  try {
    child = start_trainer(attempt_dir);
  } catch (const std::exception& e) {
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED, e.what());
  }
  listener_.on_status(status_update(assignment_, lomo::v1::JOB_STATE_RUNNING, ""));
  TrainerChannel channel(attempt_protocol_file(attempt_dir));
  const ExitStatus exit = follow_trainer(*child, channel);
  if (channel.pending_bytes() > 0) {
    emit_log("lomo-worker: the training process's last protocol line is unfinished (" +
             std::to_string(channel.pending_bytes()) + " bytes)");
    flush_events();
  }
  return outcome_of(exit);
}

lomo::v1::JobStatusUpdate JobRunner::outcome_of(const ExitStatus& exit) {
  if (cancel_requested_) {
    // The checkpoint the trainer wrote when it was stopped goes up before the cancel is
    // confirmed (while the coordinator still accepts it): a cancelled job keeps its newest step.
    // Bounded by the cancel's grace period, so that a cancel stays prompt.
    std::string upload_error;
    const auto upload = uploader_->wait_idle(Clock::now() + options_.cancel_grace, &upload_error);
    uploader_->abandon();
    if (upload == CheckpointUploader::Outcome::kDone) {
      delivered_ = true;
      return status_update(assignment_, lomo::v1::JOB_STATE_CANCELLED, "cancelled");
    }
    if (upload == CheckpointUploader::Outcome::kTimedOut) {
      upload_error = "its upload did not finish within the cancel grace period";
    }
    return status_update(assignment_, lomo::v1::JOB_STATE_CANCELLED,
                         "cancelled; the last checkpoint was not kept: " + upload_error);
  }
  if (kill_requested_) {
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED,
                         "the worker was stopped at once (second signal); training process " +
                             describe_child_end(exit.signaled, exit.code, exit.signal));
  }
  // Whatever the outcome, the newest checkpoint goes up first: a retry resumes from it.
  std::string upload_error;
  const auto upload = uploader_->wait_idle(Clock::now() + options_.finish_timeout, &upload_error);
  if (upload == CheckpointUploader::Outcome::kTimedOut) {
    upload_error = "the upload of the last checkpoint did not finish within " +
                   std::to_string(options_.finish_timeout.count() / 1000) + "s";
  }
  delivered_ = upload == CheckpointUploader::Outcome::kDone;
  return outcome_of_report(exit, delivered_, upload_error);
}

// The trainer stopped cleanly when told to and its checkpoint is committed: a drain (this worker's
// SIGTERM) or a gang peer's (the ranks stop together), not a failure. The coordinator queues the
// job again without using its restart budget.
lomo::v1::JobStatusUpdate JobRunner::preempted_status() const {
  const std::string where = "training stopped at step " + std::to_string(outcome_->steps_done) +
                            " of " + std::to_string(outcome_->total_steps);
  lomo::v1::JobStatusUpdate status = status_update(
      assignment_, lomo::v1::JOB_STATE_FAILED,
      stop_requested_ ? "interrupted: the worker was shut down (preempted); " + where +
                            " and its checkpoint is on the coordinator"
                      : "interrupted: the training process was stopped by a signal from outside "
                        "the worker (preempted; in a gang, a peer's worker may have been shut "
                        "down); " +
                            where + " and its checkpoint is on the coordinator");
  status.set_preempted(true);
  return status;
}

// The decision: the protocol's outcome record, which must agree with the exit code.
lomo::v1::JobStatusUpdate JobRunner::outcome_of_report(const ExitStatus& exit, bool uploaded,
                                                       const std::string& upload_error) {
  auto failed = [&](std::string reason) {
    if (!uploaded) reason += "\n(also: " + upload_error + ")";
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED, reason);
  };
  const std::string how = describe_child_end(exit.signaled, exit.code, exit.signal);
  if (protocol_error_) {
    return failed("training process " + how +
                  ", and its report is unreadable: " + *protocol_error_);
  }
  if (!outcome_) {
    if (exit.success()) {
      return failed("training process " + how +
                    " without reporting an outcome (no outcome record in its protocol file)");
    }
    return failed(failure_reason(how));
  }
  const std::string status(protocol::status_name(outcome_->status));
  if (exit.signaled || exit.code != protocol::exit_code_for(outcome_->status)) {
    return failed(failure_reason(how) + "\n(its report said '" + status + "', whose exit code is " +
                  std::to_string(protocol::exit_code_for(outcome_->status)) + ")");
  }
  const protocol::Status result = outcome_->status;
  if (result != protocol::Status::kSucceeded && result != protocol::Status::kInterrupted) {
    lomo::v1::JobStatusUpdate status = failed(failure_reason(how));
    // A spec or data that cannot be used, or weights gone non-finite, fail again on any attempt;
    // anything else (an I/O error, a lost peer) may not.
    status.set_permanent(result == protocol::Status::kBadSpec ||
                         result == protocol::Status::kBadData ||
                         result == protocol::Status::kNonFinite);
    if (outcome_->peer_rank) status.set_peer_rank(static_cast<int32_t>(*outcome_->peer_rank));
    return status;
  }
  if (!uploaded) {
    return status_update(assignment_, lomo::v1::JOB_STATE_FAILED,
                         "training finished but " + upload_error);
  }
  if (result == protocol::Status::kInterrupted) return preempted_status();
  return status_update(assignment_, lomo::v1::JOB_STATE_SUCCEEDED, "");
}

}  // namespace lomo::daemon
