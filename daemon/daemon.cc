#include "daemon/daemon.h"

#include "common/log.h"

namespace lomo::daemon {
namespace {

using Clock = std::chrono::steady_clock;

bool terminal(lomo::v1::JobState state) {
  return state == lomo::v1::JOB_STATE_SUCCEEDED || state == lomo::v1::JOB_STATE_FAILED ||
         state == lomo::v1::JOB_STATE_CANCELLED;
}

}  // namespace

Daemon::Daemon(DaemonOptions options)
    : options_(std::move(options)),
      metrics_(std::make_unique<WorkerMetrics>(options_.metrics_listen)),
      fetcher_(options_.coordinator, options_.worker_id, std::chrono::hours(6)) {
  std::filesystem::create_directories(options_.work_dir);
  SessionOptions session;
  session.address = options_.coordinator;
  session.registration.set_worker_id(options_.worker_id);
  *session.registration.mutable_device() = options_.device.info;
  session.registration.set_version(options_.version);
  session.registration.set_advertise_address(options_.advertise_address);
  session.connect_timeout = options_.connect_timeout;
  session_ =
      std::make_unique<Session>(std::move(session), static_cast<SessionHandler&>(*this), outbox_);
}

Daemon::~Daemon() {
  session_->stop();  // first: no more messages arrive, and uploads blocked on the outbox return
  std::lock_guard lock(mutex_);
  if (runner_) {
    runner_->kill();
    runner_->join();
  }
}

int Daemon::run() {
  log_line("worker " + options_.worker_id + " on " + options_.device.info.name() + " (" +
           std::to_string(options_.device.info.memory_bytes() >> 20) + " MiB), coordinator " +
           options_.coordinator + ", work directory " + options_.work_dir.string() +
           ", gang peers reach it at " + options_.advertise_address);
  if (metrics_->port() != 0) {
    log_line("metrics on port " + std::to_string(metrics_->port()) + " at /metrics");
  }
  session_->start();

  std::unique_lock lock(mutex_);
  while (shutdown_requests_ == 0) {
    changed_.wait_for(lock, std::chrono::milliseconds(200));
    reap_finished_runner();
  }

  // Graceful shutdown: the attempt checkpoints, uploads and reports; then the reports go out.
  const auto deadline = Clock::now() + options_.shutdown_timeout;
  if (runner_) {
    log_line("shutting down: stopping job " + runner_->job_id() +
             " (the training process finishes its step and checkpoints)");
    runner_->stop();
    while (runner_ && !runner_->finished() && Clock::now() < deadline) {
      changed_.wait_for(lock, std::chrono::milliseconds(200));
    }
    if (runner_ && !runner_->finished()) {
      log_line("shutting down: the job did not stop within the shutdown timeout; killing it");
      runner_->kill();
      while (runner_ && !runner_->finished())
        changed_.wait_for(lock, std::chrono::milliseconds(200));
    }
  } else {
    log_line("shutting down");
  }
  // The runner's thread does not take mutex_, so joining it here cannot deadlock.
  reap_finished_runner();
  lock.unlock();

  // The last reports get at least a few seconds, even past the deadline.
  const auto report_deadline = std::max(deadline, Clock::now() + std::chrono::seconds(5));
  const bool delivered = session_->shutdown(report_deadline);
  if (!delivered) {
    log_line("exiting with " + std::to_string(outbox_.reliable_pending()) +
             " report(s) the coordinator never received");
    return 1;
  }
  log_line("stopped");
  return 0;
}

void Daemon::request_shutdown() {
  std::lock_guard lock(mutex_);
  ++shutdown_requests_;
  draining_ = true;
  if (shutdown_requests_ >= 2 && runner_) {
    log_line("second stop signal: killing the training process");
    runner_->kill();
  }
  changed_.notify_all();
}

void Daemon::reap_finished_runner() {
  if (!runner_ || !runner_->reported()) return;
  runner_->join();
  metrics_->job_finished(runner_->final_status().state());
  runner_.reset();
  // The attempt's results are delivered (or it is kept, unmarked): old attempts go now, not while
  // one trains.
  for (const auto& dir :
       remove_old_attempt_directories(options_.work_dir, options_.keep_attempts)) {
    log_line("removed old attempt directory " + dir.string());
  }
}

void Daemon::start_attempt(const lomo::v1::Assignment& assignment) {
  JobRunnerOptions runner;
  runner.work_dir = options_.work_dir;
  runner.trainer_program = options_.trainer_program;
  runner.trainer_env = options_.device.child_env;
  runner.cancel_grace = options_.cancel_grace;
  runner.finish_timeout = options_.shutdown_timeout;
  runner.gang.coordinator = options_.coordinator;
  runner.gang.worker_id = session_->worker_id();
  runner.gang.advertise_address = options_.advertise_address;
  log_line("assigned job " + assignment.job_id() + " attempt " +
           std::to_string(assignment.attempt()) +
           (assignment.world_size() > 1 ? " as rank " + std::to_string(assignment.rank()) + " of " +
                                              std::to_string(assignment.world_size())
                                        : ""));
  metrics_->job_started();
  runner_ = std::make_unique<JobRunner>(assignment, runner, static_cast<JobRunnerListener&>(*this),
                                        static_cast<ChunkChannel&>(*this), &fetcher_);
}

void Daemon::report(lomo::v1::JobStatusUpdate status) {
  status.set_draining(draining_.load());
  lomo::v1::WorkerMessage message;
  *message.mutable_status() = std::move(status);
  outbox_.push(std::move(message));
}

void Daemon::on_registered(const lomo::v1::Registered&, uint64_t) {
  metrics_->set_connected(true);
  metrics_->connection_established();
}

void Daemon::on_disconnected(uint64_t, const std::string&) { metrics_->set_connected(false); }

void Daemon::on_message(const lomo::v1::CoordinatorMessage& message) {
  std::lock_guard lock(mutex_);
  if (message.has_assignment()) {
    const auto& a = message.assignment();
    reap_finished_runner();
    if (runner_) {
      if (runner_->job_id() == a.job_id() && runner_->attempt() == a.attempt()) return;  // resent
      log_line("refusing job " + a.job_id() + ": job " + runner_->job_id() + " is running here");
      lomo::v1::JobStatusUpdate busy;
      busy.set_job_id(a.job_id());
      busy.set_attempt(a.attempt());
      busy.set_state(lomo::v1::JOB_STATE_FAILED);
      busy.set_reason("worker " + session_->worker_id() + " is busy with job " + runner_->job_id() +
                      " (one attempt per worker)");
      report(std::move(busy));
      return;
    }
    if (shutdown_requests_ > 0) {
      // Not started, and not a failure: the job goes back to the queue at once.
      log_line("refusing job " + a.job_id() + ": shutting down");
      lomo::v1::JobStatusUpdate refused;
      refused.set_job_id(a.job_id());
      refused.set_attempt(a.attempt());
      refused.set_state(lomo::v1::JOB_STATE_FAILED);
      refused.set_preempted(true);
      refused.set_reason("worker " + session_->worker_id() +
                         " is shutting down (preempted); the attempt was not started");
      report(std::move(refused));
      return;
    }
    start_attempt(a);
  } else if (message.has_cancel()) {
    const auto& c = message.cancel();
    if (c.stale() && runner_ && !runner_->reported() && runner_->job_id() == c.job_id() &&
        c.attempt() == runner_->attempt()) {
      // The job moved on while this worker was away: nothing more of this attempt may be
      // written or uploaded (a new attempt may already train from the same checkpoint).
      log_line("job " + c.job_id() + " attempt " + std::to_string(c.attempt()) +
               " is stale (the job moved on while this worker was away): SIGKILL to the training "
               "process, nothing uploaded");
      runner_->kill();
      return;
    }
    if (runner_ && !runner_->reported() && runner_->job_id() == c.job_id() &&
        (c.attempt() == 0 || c.attempt() == runner_->attempt())) {
      log_line("cancelling job " + c.job_id() + " (SIGTERM to the training process)");
      runner_->cancel();
      return;
    }
    // Not running here (already ended, or never started): confirm so the coordinator converges.
    if (!runner_ || runner_->job_id() != c.job_id()) {
      lomo::v1::JobStatusUpdate cancelled;
      cancelled.set_job_id(c.job_id());
      cancelled.set_attempt(c.attempt());
      cancelled.set_state(lomo::v1::JOB_STATE_CANCELLED);
      cancelled.set_reason("cancelled (it was not running on worker " + session_->worker_id() +
                           ")");
      report(std::move(cancelled));
    }
  } else if (message.has_checkpoint_ack()) {
    if (runner_) runner_->on_ack(message.checkpoint_ack());
  } else if (message.has_registered()) {
    // Only valid as the first message of a stream; the session handles that one.
  }
}

lomo::v1::Heartbeat Daemon::heartbeat() {
  std::lock_guard lock(mutex_);
  lomo::v1::Heartbeat beat;
  beat.set_draining(draining_.load());
  if (runner_ && !runner_->reported()) {
    beat.set_job_id(runner_->job_id());
    beat.set_attempt(runner_->attempt());
  }
  return beat;
}

void Daemon::on_status(const lomo::v1::JobStatusUpdate& status) {
  report(status);
  if (terminal(status.state())) changed_.notify_all();
}

void Daemon::on_events(const lomo::v1::JobEvents& events) {
  lomo::v1::WorkerMessage message;
  *message.mutable_events() = events;
  outbox_.push(std::move(message));
}

void Daemon::on_training_metrics(const lomo::v1::TrainingMetrics& metrics,
                                 int64_t tokens_per_step) {
  metrics_->observe_step(metrics, tokens_per_step);
}

void Daemon::on_eval(const lomo::v1::EvalResult& eval) { metrics_->observe_eval(eval); }

void Daemon::on_rank_step(const std::string& job_id, int rank,
                          const trainer_protocol::Metrics& metrics) {
  metrics_->observe_rank_step(
      job_id, rank,
      {metrics.step_seconds, metrics.communication_seconds, metrics.communication_bytes});
}

uint64_t Daemon::wait_connected(Clock::time_point until) { return session_->wait_connected(until); }

uint64_t Daemon::generation() { return session_->generation(); }

bool Daemon::send(lomo::v1::WorkerMessage message, uint64_t generation) {
  const int64_t bytes = message.has_checkpoint_chunk()
                            ? static_cast<int64_t>(message.checkpoint_chunk().file().data().size())
                            : 0;
  const bool queued = outbox_.push_for_connection(std::move(message), generation);
  if (queued && bytes > 0) metrics_->checkpoint_bytes_uploaded(bytes);
  return queued;
}

}  // namespace lomo::daemon
