#include "server/coordinator.h"

#include <algorithm>
#include <set>
#include <vector>

#include "common/log.h"

namespace lomo::server {

Coordinator::Coordinator(CoordinatorOptions options, Store& store, CheckpointStore& checkpoints,
                         Metrics& metrics)
    : state_(options, store, checkpoints, metrics, hub_),
      lifecycle_(state_),
      registry_(state_, lifecycle_),
      checkpoint_commit_(state_),
      queries_(store, checkpoints, state_.scheduler) {}

Coordinator::~Coordinator() { stop(); }

void Coordinator::start() {
  for (const auto& [state, count] : state_.store.count_jobs_by_state()) {
    state_.metrics.set_jobs(state, count);
  }
  const std::vector<std::string> ids = state_.store.all_checkpoint_ids();
  const int removed = state_.checkpoints.recover(std::set<std::string>(ids.begin(), ids.end()));
  if (removed > 0) log_line("removed " + std::to_string(removed) + " uncommitted checkpoint dirs");
  lifecycle_.restore();
  state_.store.make_durable();
  sweeper_ = std::thread([this] { background_loop(); });
}

void Coordinator::begin_shutdown() {
  {
    std::lock_guard lock(state_.mu);
    if (state_.shutting_down) return;
    state_.shutting_down = true;
    registry_.close_streams_locked();
  }
  {
    std::lock_guard lock(sweeper_mu_);
    sweeper_stop_ = true;
    sweeper_wake_.notify_all();
  }
  hub_.close();
}

bool Coordinator::shutting_down() const {
  std::lock_guard lock(state_.mu);
  return state_.shutting_down;
}

void Coordinator::stop() {
  {
    std::lock_guard lock(sweeper_mu_);
    sweeper_stop_ = true;
    sweeper_wake_.notify_all();
  }
  if (sweeper_.joinable()) sweeper_.join();
}

void Coordinator::submit_job(const v1::SubmitJobRequest& request, const std::string& owner,
                             v1::SubmitJobResponse* response, Done done) {
  const grpc::Status status = lifecycle_.submit(request, owner, response);
  if (!status.ok()) return done(status);
  state_.when_durable(std::move(done), "job " + response->job().id());
}

void Coordinator::cancel_job(const v1::CancelJobRequest& request, v1::CancelJobResponse* response,
                             Done done) {
  const grpc::Status status = lifecycle_.cancel(request, response);
  if (!status.ok()) return done(status);
  state_.when_durable(std::move(done), "the cancellation of job " + request.job_id());
}

Clock::duration Coordinator::stall_threshold(const CoordinatorOptions& options,
                                             Clock::duration tick) {
  // Well above a late tick on a loaded machine, well below the heartbeat timeout.
  const auto half_timeout = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(options.heartbeat_timeout_seconds / 2));
  return std::max<Clock::duration>(std::min<Clock::duration>(std::chrono::seconds(2), half_timeout),
                                   5 * tick);
}

void Coordinator::background_loop() {
  // Scanning ten times per timeout bounds the detection delay to 1.1 timeouts.
  const auto scan_period =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
          std::clamp(state_.options.heartbeat_timeout_seconds / 10, 0.02, 1.0)));
  const auto tick = std::min<Clock::duration>(scan_period, kDurabilityDelay);
  Clock::time_point next_scan = Clock::now() + scan_period;
  Clock::time_point last_tick = Clock::now();
  std::unique_lock lock(sweeper_mu_);
  while (!sweeper_stop_) {
    sweeper_wake_.wait_for(lock, tick, [this] { return sweeper_stop_; });
    if (sweeper_stop_) break;
    lock.unlock();
    const Clock::time_point now = Clock::now();
    if (now - last_tick > stall_threshold(state_.options, tick)) {
      // This process did not run (SIGSTOP, a paused VM, swapping): the heartbeats sent meanwhile
      // are still unread in the streams. Judge nobody by a silence that was ours.
      log_line("the coordinator stalled for " +
               std::to_string(
                   std::chrono::duration_cast<std::chrono::milliseconds>(now - last_tick).count()) +
               " ms; workers get a full heartbeat timeout from now before any is judged dead");
      registry_.grant_grace(now);
    }
    last_tick = now;
    if (Clock::now() >= next_scan) {
      registry_.check_heartbeats();
      next_scan = Clock::now() + scan_period;
    }
    lifecycle_.start_due_restarts();  // a restart's backoff ends within one tick
    lifecycle_.check_timeouts();      // ASSIGNED without RUNNING, unconfirmed cancels
    // What workers reported (states, events) becomes durable within kDurabilityDelay without
    // making their streams wait for a disk sync; no sync when nothing was committed since.
    state_.when_durable([](const grpc::Status&) {}, "recent job updates");
    lock.lock();
  }
}

}  // namespace lomo::server
