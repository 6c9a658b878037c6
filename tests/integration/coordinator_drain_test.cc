// Drains, preemptions and operational timeouts against a real lomo-coordinator: test workers on
// real gRPC streams report what a daemon reports when it gets SIGTERM (JobStatusUpdate.preempted,
// Heartbeat.draining), or say nothing at all. A preempted attempt is queued again at once without
// using the restart budget; a gang waits for rank 0's last checkpoint before a preemption or a
// cancel ends its attempt; an assignment never acknowledged fails (and is restarted) and a cancel
// never confirmed ends CANCELLED, each after its timeout and saying so.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <string>
#include <thread>

#include "tests/integration/coordinator_harness.h"
#include "tests/integration/coordinator_test_fixture.h"

namespace lomo::server::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

v1::WorkerMessage draining_heartbeat() {
  v1::WorkerMessage message;
  message.mutable_heartbeat()->set_draining(true);
  return message;
}

// What a daemon reports when its trainer stopped and checkpointed because a SIGTERM reached it or
// (in a gang) a peer; `draining`: this worker got the SIGTERM and is shutting down.
v1::JobStatusUpdate preempted(const std::string& job_id, int64_t attempt, bool draining) {
  v1::JobStatusUpdate status;
  status.set_job_id(job_id);
  status.set_attempt(attempt);
  status.set_state(v1::JOB_STATE_FAILED);
  status.set_preempted(true);
  status.set_draining(draining);
  status.set_reason(
      "interrupted: the worker was shut down (preempted); training stopped at step 7");
  return status;
}

class CoordinatorDrainTest : public CoordinatorTest {
 protected:
  // Timeouts far beyond any test's length unless a test sets them.
  explicit CoordinatorDrainTest(std::vector<std::string> extra_args = {})
      : CoordinatorTest(10.0), extra_args_(std::move(extra_args)) {}

  void SetUp() override {
    ProcessOptions options(dir_.path() / "data", heartbeat_timeout_seconds_);
    options.extra_args = extra_args_;
    coordinator_ = std::make_unique<CoordinatorProcess>(options);
    jobs_ = coordinator_->jobs();
  }

  std::vector<int64_t> committed_steps(const std::string& job_id) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + seconds(10));
    v1::ListCheckpointsRequest request;
    request.set_job_id(job_id);
    v1::ListCheckpointsResponse response;
    EXPECT_TRUE(jobs_->ListCheckpoints(&context, request, &response).ok());
    std::vector<int64_t> steps;
    for (const auto& checkpoint : response.checkpoints()) steps.push_back(checkpoint.step());
    return steps;
  }

  const std::vector<std::string> extra_args_;
};

// Polls `text_of` until it contains `wanted`; false after `timeout`.
bool wait_until_text(const std::function<std::string()>& text_of, const std::string& wanted,
                     std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (text_of().find(wanted) == std::string::npos) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(milliseconds(50));
  }
  return true;
}

const std::map<std::string, std::string> kCheckpointFiles{{"model.safetensors", "weights"},
                                                          {"trainer_state.json", "{}"}};

TEST_F(CoordinatorDrainTest, APreemptedAttemptIsQueuedAgainAtOnceWithoutUsingTheRestartBudget) {
  auto w1 = worker("w1");
  // No restart budget at all: a preemption still gets a new attempt.
  const std::string id = submit_ok(with_restarts(submit_request("drained"), 0));
  const v1::Assignment first = assignment_of(*w1);
  ASSERT_EQ(first.attempt(), 1);
  ASSERT_TRUE(w1->report(id, 1, v1::JOB_STATE_RUNNING));
  // The daemon got SIGTERM: its heartbeats say it drains, then it reports the preemption.
  w1->stop_heartbeats();
  ASSERT_TRUE(w1->send(draining_heartbeat()));
  ASSERT_TRUE(w1->report(preempted(id, 1, true)));

  const v1::Job queued = wait_for_state(*jobs_, id, v1::JOB_STATE_QUEUED, seconds(10));
  ASSERT_EQ(queued.attempts_size(), 1);
  EXPECT_TRUE(queued.attempts(0).preempted());
  EXPECT_FALSE(queued.attempts(0).restarted());
  EXPECT_EQ(queued.attempts(0).state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(history(id), HasSubstr("queued again after attempt 1 was preempted on worker w1: "
                                     "interrupted: the worker was shut down (preempted)"));
  // A draining worker gets no new job, though it is connected and runs nothing.
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(w1->send(draining_heartbeat()));
    EXPECT_FALSE(w1->next_assignment(milliseconds(300)).has_value())
        << "the draining worker was given a job";
  }

  auto w2 = worker("w2");
  const v1::Assignment second = assignment_of(*w2);
  EXPECT_EQ(second.job_id(), id);
  EXPECT_EQ(second.attempt(), 2);
  ASSERT_TRUE(w2->report(id, 2, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(w2->report(id, 2, v1::JOB_STATE_SUCCEEDED));
  const v1::Job done = wait_for_state(*jobs_, id, v1::JOB_STATE_SUCCEEDED, seconds(10));
  ASSERT_EQ(done.attempts_size(), 2);
  EXPECT_TRUE(done.attempts(0).preempted());
  EXPECT_EQ(done.attempts(1).state(), v1::JOB_STATE_SUCCEEDED);
  const std::string metrics = "\n" + http_request(*coordinator_, "GET", "/metrics").body;
  EXPECT_THAT(metrics, HasSubstr("\nlomo_job_restarts_total 0\n"));
}

TEST_F(CoordinatorDrainTest, AGangPreemptedOnRankOneWaitsForRankZerosCheckpointThenQueuesAgain) {
  auto w0 = worker("g0");
  auto w1 = worker("g1");
  const std::string id = submit_ok(with_restarts(gang_request("gang-drain", 2), 0));
  const v1::Assignment a0 = assignment_of(*w0);
  const v1::Assignment a1 = assignment_of(*w1);
  ASSERT_EQ(a0.rank(), 0);
  ASSERT_EQ(a1.rank(), 1);
  ASSERT_TRUE(w0->report(id, 1, v1::JOB_STATE_RUNNING));
  // The two streams are not ordered: rank 0 must be known to run before rank 1's drain arrives
  // (the job turns RUNNING on its first rank's report, here rank 0's).
  wait_for_state(*jobs_, id, v1::JOB_STATE_RUNNING, seconds(10));
  ASSERT_TRUE(w1->report(id, 1, v1::JOB_STATE_RUNNING));
  // Rank 1's worker is drained; its trainer's stop reaches rank 0's, which checkpoints.
  w1->stop_heartbeats();
  ASSERT_TRUE(w1->send(draining_heartbeat()));
  ASSERT_TRUE(w1->report(preempted(id, 1, true)));
  ASSERT_TRUE(wait_until_text(
      [&] { return history(id); },
      "the attempt ends when rank 0 (worker g0) has uploaded its last checkpoint", seconds(10)));
  EXPECT_EQ(job_now(id).state(), v1::JOB_STATE_RUNNING) << "the attempt ended before rank 0";

  const auto ack = w0->upload_checkpoint(id, 1, 7, kCheckpointFiles);
  ASSERT_TRUE(ack.has_value());
  EXPECT_TRUE(ack->committed()) << ack->error();
  ASSERT_TRUE(w0->report(preempted(id, 1, false)));
  const v1::Job queued = wait_for_state(*jobs_, id, v1::JOB_STATE_QUEUED, seconds(10));
  ASSERT_EQ(queued.attempts_size(), 1);
  EXPECT_TRUE(queued.attempts(0).preempted());
  EXPECT_EQ(committed_steps(id), std::vector<int64_t>{7});

  // The next attempt takes rank 0's worker and a new one, never the draining one.
  auto w2 = worker("g2");
  w0->set_current("", 0);
  const v1::Assignment b0 = assignment_of(*w0);
  const v1::Assignment b1 = assignment_of(*w2);
  EXPECT_EQ(b0.attempt(), 2) << job_now(id).wait_reason();
  EXPECT_EQ(b1.attempt(), 2);
}

TEST_F(CoordinatorDrainTest, CancellingAGangKeepsTheCheckpointRankZeroWritesWhenStopped) {
  auto w0 = worker("c0");
  auto w1 = worker("c1");
  const std::string id = submit_ok(gang_request("gang-cancel", 2));
  assignment_of(*w0);
  assignment_of(*w1);
  ASSERT_TRUE(w0->report(id, 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, id, v1::JOB_STATE_RUNNING, seconds(10));  // rank 0 known to run first
  ASSERT_TRUE(w1->report(id, 1, v1::JOB_STATE_RUNNING));
  v1::Job cancelling;
  ASSERT_TRUE(cancel(*jobs_, id, &cancelling).ok());
  ASSERT_TRUE(w1->next_of(v1::CoordinatorMessage::kCancel, seconds(10)).has_value());
  ASSERT_TRUE(w0->next_of(v1::CoordinatorMessage::kCancel, seconds(10)).has_value());
  // Rank 1 (which writes no checkpoint) confirms first; rank 0 is still writing its own.
  ASSERT_TRUE(w1->report(id, 1, v1::JOB_STATE_CANCELLED, "cancelled"));
  ASSERT_TRUE(wait_until_text([&] { return history(id); },
                              "a rank stopped for the cancel; the attempt ends when rank 0 "
                              "(worker c0) has uploaded",
                              seconds(10)));
  EXPECT_EQ(job_now(id).state(), v1::JOB_STATE_RUNNING);
  const auto ack = w0->upload_checkpoint(id, 1, 12, kCheckpointFiles);
  ASSERT_TRUE(ack.has_value());
  EXPECT_TRUE(ack->committed()) << ack->error();
  ASSERT_TRUE(w0->report(id, 1, v1::JOB_STATE_CANCELLED, "cancelled"));
  const v1::Job done = wait_for_state(*jobs_, id, v1::JOB_STATE_CANCELLED, seconds(10));
  EXPECT_EQ(committed_steps(id), std::vector<int64_t>{12});
  ASSERT_EQ(done.attempts_size(), 1);
  EXPECT_EQ(done.attempts(0).state(), v1::JOB_STATE_CANCELLED);
}

class CoordinatorTimeoutTest : public CoordinatorDrainTest {
 protected:
  CoordinatorTimeoutTest()
      : CoordinatorDrainTest({"--assigned-timeout", "2", "--cancel-timeout", "2"}) {}
};

TEST_F(CoordinatorTimeoutTest, AnAssignmentNeverAcknowledgedFailsAfterTheTimeoutAndIsRestarted) {
  auto w = worker("silent");
  const std::string id = submit_ok(with_restarts(submit_request("unacknowledged"), 1));
  // The worker heartbeats the attempt (it is alive) but never reports RUNNING.
  const v1::Assignment first = assignment_of(*w);
  ASSERT_EQ(first.attempt(), 1);
  const v1::Job queued = wait_for_state(*jobs_, id, v1::JOB_STATE_QUEUED, seconds(20));
  ASSERT_EQ(queued.attempts_size(), 1);
  EXPECT_TRUE(queued.attempts(0).restarted());
  EXPECT_EQ(queued.attempts(0).reason(),
            "worker silent did not acknowledge the assignment (no RUNNING) within 2.0 s");
  // It is told to stop the attempt it never acknowledged.
  EXPECT_TRUE(w->next_of(v1::CoordinatorMessage::kCancel, seconds(10)).has_value());
}

TEST_F(CoordinatorTimeoutTest, ACancelNoWorkerConfirmsEndsCancelledAfterTheTimeout) {
  auto w = worker("deaf");
  const std::string id = submit_ok(submit_request("unconfirmed"));
  assignment_of(*w);
  ASSERT_TRUE(w->report(id, 1, v1::JOB_STATE_RUNNING));
  v1::Job cancelling;
  ASSERT_TRUE(cancel(*jobs_, id, &cancelling).ok());
  ASSERT_TRUE(w->next_of(v1::CoordinatorMessage::kCancel, seconds(10)).has_value());
  // The worker keeps heartbeating the attempt and never confirms.
  const v1::Job done = wait_for_state(*jobs_, id, v1::JOB_STATE_CANCELLED, seconds(20));
  EXPECT_THAT(history(id),
              HasSubstr("cancelled by request; worker deaf did not confirm the cancellation "
                        "within 2.0 s"));
  // Still running the attempt, the worker gets no other job.
  const std::string next = submit_ok(submit_request("next"));
  EXPECT_FALSE(w->next_assignment(seconds(2)).has_value());
  EXPECT_EQ(job_now(next).state(), v1::JOB_STATE_QUEUED);
}

}  // namespace
}  // namespace lomo::server::testing
