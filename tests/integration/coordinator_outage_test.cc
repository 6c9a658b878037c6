// The coordinator never blames workers for its own outage (issue 10, deliverable 3), against a
// real lomo-coordinator with test workers on real gRPC streams over loopback:
// - the re-attach window a worker whose stream broke keeps its attempt for is derived from the
//   workers' reconnect backoff (common/reconnect.h), and the defaults keep window > largest
//   backoff delay + one dial;
// - a worker back within the window keeps its attempt, one that stays away longer loses it;
// - a coordinator stalled by SIGSTOP for longer than the heartbeat timeout judges nobody dead
//   when it wakes (fast: scaled down; `slow`: the real 15 s against the default 10 s timeout).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <memory>
#include <thread>

#include "common/reconnect.h"
#include "daemon/backoff.h"
#include "daemon/session.h"
#include "server/config.h"
#include "tests/integration/coordinator_harness.h"

namespace lomo::server::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

double in_seconds(std::chrono::milliseconds d) { return std::chrono::duration<double>(d).count(); }

TEST(ReattachWindowDefaults, ExceedTheLongestAWorkerTakesToDialAgain) {
  const daemon::SessionOptions worker;  // what lomo-workerd uses
  const CoordinatorConfig coordinator;  // what lomo-coordinator uses without flags
  const double worst_reconnect = in_seconds(worker.max_backoff + worker.connect_timeout);
  EXPECT_EQ(worst_reconnect, 20.0);
  EXPECT_GT(coordinator.reattach_window_seconds, worst_reconnect);
  EXPECT_GT(coordinator.reattach_window_seconds, coordinator.heartbeat_timeout_seconds);
  // The command line without --reattach-window keeps the derived default.
  bool help = false;
  const CoordinatorConfig parsed = config_from_command_line({"--data-dir", "/tmp/x"}, &help);
  EXPECT_EQ(parsed.reattach_window_seconds, coordinator.reattach_window_seconds);
  // No delay the backoff draws is above its maximum, however long the outage.
  daemon::Backoff backoff(worker.initial_backoff, worker.max_backoff);
  for (int attempt = 0; attempt < 1000; ++attempt) {
    ASSERT_LE(backoff.next(), worker.max_backoff) << "attempt " << attempt;
  }
}

TEST(ReattachWindowDefaults, CanBeSetAndIsValidated) {
  bool help = false;
  EXPECT_EQ(config_from_command_line({"--data-dir", "/tmp/x", "--reattach-window", "40"}, &help)
                .reattach_window_seconds,
            40.0);
  EXPECT_EQ(parse_config("data_dir: /tmp/x\nreattach_window_seconds: 31\n", "c.yaml")
                .reattach_window_seconds,
            31.0);
  try {
    config_from_command_line({"--data-dir", "/tmp/x", "--reattach-window", "0"}, &help);
    ADD_FAILURE() << "a zero window was accepted";
  } catch (const ConfigError& error) {
    EXPECT_THAT(error.what(), HasSubstr("reattach_window_seconds"));
  }
}

class CoordinatorOutageTest : public ::testing::Test {
 protected:
  void start(double heartbeat_timeout, int heartbeat_interval_ms, double reattach_window) {
    ProcessOptions options(dir_.path() / "data", heartbeat_timeout);
    options.heartbeat_interval_ms = heartbeat_interval_ms;
    options.reattach_window_seconds = reattach_window;
    interval_ = milliseconds(heartbeat_interval_ms);
    coordinator_ = std::make_unique<CoordinatorProcess>(options);
    jobs_ = coordinator_->jobs();
  }
  void TearDown() override {
    if (coordinator_ && coordinator_->pid() > 0) ::kill(coordinator_->pid(), SIGCONT);
    if (HasFailure() && coordinator_) std::cerr << "coordinator log:\n" << coordinator_->log();
  }

  // A worker `id` running a fresh job's attempt 1 (RUNNING), heartbeating it.
  std::unique_ptr<TestWorker> running_worker(const std::string& id, v1::Job* job) {
    auto w = std::make_unique<TestWorker>(coordinator_->channel());
    w->register_as(id);
    w->start_heartbeats(interval_);
    EXPECT_TRUE(submit(*jobs_, submit_request("job-of-" + id), job).ok());
    EXPECT_TRUE(w->next_assignment(seconds(10)).has_value());
    w->set_current(job->id(), 1);
    EXPECT_TRUE(w->report(job->id(), 1, v1::JOB_STATE_RUNNING));
    wait_for_state(*jobs_, job->id(), v1::JOB_STATE_RUNNING, seconds(30));
    return w;
  }

  // The worker comes back on a new stream with its current attempt, as the daemon does.
  std::unique_ptr<TestWorker> reattach(const std::string& id, const std::string& job_id) {
    auto w = std::make_unique<TestWorker>(coordinator_->channel());
    w->register_as(id);
    w->set_current(job_id, 1);
    w->start_heartbeats(interval_);
    return w;
  }

  v1::JobState state_of(const std::string& job_id) {
    v1::Job job;
    EXPECT_TRUE(get(*jobs_, job_id, &job).ok());
    return job.state();
  }

  // SIGSTOP for `how_long`, then SIGCONT; waits until the coordinator logged its stall.
  void stall(std::chrono::milliseconds how_long) {
    ASSERT_EQ(::kill(coordinator_->pid(), SIGSTOP), 0);
    std::this_thread::sleep_for(how_long);  // the stall itself is what is tested
    ASSERT_EQ(::kill(coordinator_->pid(), SIGCONT), 0);
    ASSERT_TRUE(wait_until(
        [&] { return coordinator_->log().find("stalled for") != std::string::npos; }, seconds(30)))
        << "the coordinator did not notice its own stall";
  }

  // After a stall: the worker is not judged dead for 1.5 heartbeat timeouts (a dead-worker scan
  // runs every tenth of one), and its job ends as it reports.
  void expect_job_survives(TestWorker& worker, const std::string& job_id, double timeout) {
    const auto closed = worker.wait_closed(
        std::chrono::duration_cast<milliseconds>(std::chrono::duration<double>(1.5 * timeout)));
    EXPECT_FALSE(closed.has_value())
        << "the healthy worker's stream was closed: " << closed->error_message();
    EXPECT_EQ(state_of(job_id), v1::JOB_STATE_RUNNING);
    ASSERT_TRUE(worker.report(job_id, 1, v1::JOB_STATE_SUCCEEDED));
    EXPECT_EQ(wait_for_state(*jobs_, job_id, v1::JOB_STATE_SUCCEEDED, seconds(30)).state(),
              v1::JOB_STATE_SUCCEEDED);
    EXPECT_THAT(coordinator_->log(), ::testing::Not(HasSubstr("missed heartbeats")));
  }

  TempDir dir_;
  milliseconds interval_{200};
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
};

// Scaled down: heartbeat timeout 2 s, re-attach window 6 s; the worker is away 4 s.
TEST_F(CoordinatorOutageTest, AWorkerBackWithinTheReattachWindowKeepsItsAttempt) {
  start(2.0, 200, 6.0);
  v1::Job job;
  auto first = running_worker("w-away", &job);
  first->disconnect();
  std::this_thread::sleep_for(seconds(4));  // longer than the heartbeat timeout: the point
  ASSERT_EQ(state_of(job.id()), v1::JOB_STATE_RUNNING) << "ended before the window passed";
  auto back = reattach("w-away", job.id());
  ASSERT_FALSE(back->wait_closed(seconds(3)).has_value());
  EXPECT_EQ(state_of(job.id()), v1::JOB_STATE_RUNNING);
  ASSERT_TRUE(back->report(job.id(), 1, v1::JOB_STATE_SUCCEEDED));
  EXPECT_EQ(wait_for_state(*jobs_, job.id(), v1::JOB_STATE_SUCCEEDED, seconds(30)).state(),
            v1::JOB_STATE_SUCCEEDED);
}

TEST_F(CoordinatorOutageTest, AWorkerAwayLongerThanTheWindowLosesItsAttemptWithTheReason) {
  start(1.0, 200, 4.0);
  v1::Job job;
  auto w = running_worker("w-gone", &job);
  w->disconnect();
  const auto gone = Clock::now();
  const v1::Job failed = wait_for_state(*jobs_, job.id(), v1::JOB_STATE_FAILED, seconds(30));
  const double waited = std::chrono::duration<double>(Clock::now() - gone).count();
  EXPECT_GE(waited, 4.0 - 0.3) << "ended after the heartbeat timeout, not the re-attach window";
  EXPECT_THAT(failed.failure_reason(), HasSubstr("worker w-gone missed heartbeats for"));
  EXPECT_THAT(failed.failure_reason(), HasSubstr("(disconnected; re-attach window 4.0 s)"));
}

// Scaled down: a 5 s SIGSTOP against a 2 s heartbeat timeout.
TEST_F(CoordinatorOutageTest, AStalledCoordinatorJudgesNoHealthyWorkerDeadWhenItWakes) {
  start(2.0, 200, 2.0);
  v1::Job job;
  auto w = running_worker("w-healthy", &job);
  stall(seconds(5));
  expect_job_survives(*w, job.id(), 2.0);
}

// The probe with the real defaults: SIGSTOP 15 s against the 10 s heartbeat timeout and
// 1 s heartbeats. `slow`.
TEST_F(CoordinatorOutageTest, AFifteenSecondStallWithTheDefaultTimeoutsEndsNoAttempt) {
  const CoordinatorConfig defaults;
  start(defaults.heartbeat_timeout_seconds, static_cast<int>(defaults.heartbeat_interval_ms),
        defaults.reattach_window_seconds);
  v1::Job job;
  auto w = running_worker("w-patient", &job);
  stall(seconds(15));
  expect_job_survives(*w, job.id(), defaults.heartbeat_timeout_seconds);
}

// The defaults' relation with real processes: a worker whose stream broke and that takes the
// longest its backoff allows (largest delay + one dial) to come back still owns its attempt.
// `slow`.
TEST_F(CoordinatorOutageTest, AWorkerTakingItsLongestBackoffToReturnKeepsItsAttempt) {
  const CoordinatorConfig defaults;
  start(defaults.heartbeat_timeout_seconds, 1000, defaults.reattach_window_seconds);
  v1::Job job;
  auto first = running_worker("w-slow-return", &job);
  first->disconnect();
  std::this_thread::sleep_for(kWorkerMaxBackoff + kWorkerConnectTimeout);
  auto back = reattach("w-slow-return", job.id());
  ASSERT_FALSE(back->wait_closed(seconds(3)).has_value());
  EXPECT_EQ(state_of(job.id()), v1::JOB_STATE_RUNNING);
  ASSERT_TRUE(back->report(job.id(), 1, v1::JOB_STATE_SUCCEEDED));
  EXPECT_EQ(wait_for_state(*jobs_, job.id(), v1::JOB_STATE_SUCCEEDED, seconds(30)).state(),
            v1::JOB_STATE_SUCCEEDED);
}

// Issue 10: a worker that returns after its job moved on (here: its attempt was given up when
// the window passed and attempt 2 runs on another worker) is told its attempt is stale, and
// nothing it still sends for that attempt counts: neither its status nor its checkpoint.
TEST_F(CoordinatorOutageTest, AWorkerBackAfterItsJobMovedOnIsToldItsAttemptIsStaleAndIgnored) {
  start(1.0, 200, 2.0);
  auto late = std::make_unique<TestWorker>(coordinator_->channel());
  late->register_as("w-late");
  late->start_heartbeats(interval_);
  v1::SubmitJobRequest request = submit_request("moves-on");
  (*(*request.mutable_spec()->mutable_fields())["resources"]
        .mutable_struct_value()
        ->mutable_fields())["max_restarts"]
      .set_number_value(1);
  v1::Job job;
  ASSERT_TRUE(submit(*jobs_, request, &job).ok());
  ASSERT_TRUE(late->next_assignment(seconds(10)).has_value());
  late->set_current(job.id(), 1);
  ASSERT_TRUE(late->report(job.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, job.id(), v1::JOB_STATE_RUNNING, seconds(30));
  late->disconnect();

  // The window passes: attempt 1 is given up and attempt 2 runs on another worker.
  auto next = std::make_unique<TestWorker>(coordinator_->channel());
  next->register_as("w-next");
  next->start_heartbeats(interval_);
  const auto second = next->next_assignment(seconds(30));
  ASSERT_TRUE(second.has_value());
  ASSERT_EQ(second->attempt(), 2);
  next->set_current(job.id(), 2);
  ASSERT_TRUE(next->report(job.id(), 2, v1::JOB_STATE_RUNNING));

  auto back = reattach("w-late", job.id());  // still heartbeating attempt 1
  const auto cancel = back->next_of(v1::CoordinatorMessage::kCancel, seconds(10));
  ASSERT_TRUE(cancel.has_value()) << "the stale attempt was not stopped";
  EXPECT_EQ(cancel->cancel().job_id(), job.id());
  EXPECT_EQ(cancel->cancel().attempt(), 1);
  EXPECT_TRUE(cancel->cancel().stale());

  ASSERT_TRUE(back->report(job.id(), 1, v1::JOB_STATE_SUCCEEDED));
  const auto ack = back->upload_checkpoint(job.id(), 1, 5, {{"model.safetensors", "stale"}});
  EXPECT_FALSE(ack.has_value() && ack->committed()) << "a stale attempt's checkpoint committed";
  ASSERT_TRUE(wait_until(
      [&] { return coordinator_->log().find("ignoring status SUCCEEDED") != std::string::npos; },
      seconds(10)));
  v1::Job now;
  ASSERT_TRUE(get(*jobs_, job.id(), &now).ok());
  EXPECT_EQ(now.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(now.attempt(), 2);
  EXPECT_EQ(now.progress().step(), 0) << "the stale checkpoint's step counted";

  ASSERT_TRUE(next->report(job.id(), 2, v1::JOB_STATE_SUCCEEDED));
  EXPECT_EQ(wait_for_state(*jobs_, job.id(), v1::JOB_STATE_SUCCEEDED, seconds(30)).state(),
            v1::JOB_STATE_SUCCEEDED);
}

}  // namespace
}  // namespace lomo::server::testing
