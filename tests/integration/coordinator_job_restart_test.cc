// The restart policy against a real lomo-coordinator: test workers on real gRPC streams fail
// attempts in the ways a daemon reports them. A transient failure (a crash, a lost worker) queues
// the job again as its next attempt after a backoff, within resources.max_restarts; a permanent
// one (JobStatusUpdate.permanent: bad spec or data, non-finite weights) or the same failure twice
// at the same step ends it; every ended attempt is in Job.attempts and each restart is counted in
// lomo_job_restarts_total.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "tests/integration/coordinator_harness.h"
#include "tests/integration/coordinator_test_fixture.h"

namespace lomo::server::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

constexpr double kHeartbeatTimeout = 2.0;

class CoordinatorJobRestartTest : public CoordinatorTest {
 protected:
  CoordinatorJobRestartTest() : CoordinatorTest(kHeartbeatTimeout) {}

  // Runs attempt `attempt` on `w` and fails it with `reason`.
  void fail_attempt(TestWorker& w, const std::string& id, int64_t attempt,
                    const std::string& reason) {
    const v1::Assignment assignment = assignment_of(w);
    ASSERT_EQ(assignment.job_id(), id);
    ASSERT_EQ(assignment.attempt(), attempt);
    ASSERT_TRUE(w.report(id, attempt, v1::JOB_STATE_RUNNING));
    ASSERT_TRUE(w.report(id, attempt, v1::JOB_STATE_FAILED, reason));
  }
};

TEST_F(CoordinatorJobRestartTest, ATransientFailureQueuesTheNextAttemptWhichCanSucceed) {
  auto w = worker("w1");
  const std::string id = submit_ok(with_restarts(submit_request("flaky"), 3));
  fail_attempt(*w, id, 1, "training process killed by SIGKILL (out of memory?)");

  const v1::Job queued = wait_for_state(*jobs_, id, v1::JOB_STATE_QUEUED, seconds(10));
  EXPECT_EQ(queued.attempt(), 1) << "the next attempt is numbered when it is assigned";
  EXPECT_TRUE(queued.assignments().empty());
  EXPECT_TRUE(queued.failure_reason().empty());
  EXPECT_THAT(queued.wait_reason(),
              StartsWith("restarting after attempt 1 failed on worker w1: training process killed "
                         "by SIGKILL (out of memory?) (restart 1 of 3)"));
  EXPECT_THAT(state_changes(id),
              HasSubstr("restarting after attempt 1 failed on worker w1: training process killed "
                        "by SIGKILL (out of memory?) (restart 1 of 3) in 1 s\n"));

  const v1::Assignment second = assignment_of(*w);
  EXPECT_EQ(second.job_id(), id);
  EXPECT_EQ(second.attempt(), 2);
  ASSERT_TRUE(w->report(id, 2, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(w->report(id, 2, v1::JOB_STATE_SUCCEEDED));
  const v1::Job done = wait_for_state(*jobs_, id, v1::JOB_STATE_SUCCEEDED, seconds(10));
  ASSERT_EQ(done.attempts_size(), 2);
  EXPECT_EQ(done.attempts(0).attempt(), 1);
  EXPECT_EQ(done.attempts(0).state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(done.attempts(0).reason(), "training process killed by SIGKILL (out of memory?)");
  EXPECT_TRUE(done.attempts(0).restarted());
  ASSERT_EQ(done.attempts(0).assignments_size(), 1);
  EXPECT_EQ(done.attempts(0).assignments(0).worker_id(), "w1");
  EXPECT_EQ(done.attempts(1).attempt(), 2);
  EXPECT_EQ(done.attempts(1).state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_FALSE(done.attempts(1).restarted());

  const std::string metrics = "\n" + http_request(*coordinator_, "GET", "/metrics").body;
  EXPECT_THAT(metrics, HasSubstr("\nlomo_job_restarts_total 1\n"));
}

TEST_F(CoordinatorJobRestartTest, ASpentBudgetFailsTheJobAfterItsRestarts) {
  auto w = worker("w1");
  const std::string id = submit_ok(with_restarts(submit_request("doomed"), 3));
  for (int attempt = 1; attempt <= 4; ++attempt) {
    // A different reason each time: the same failure twice would stop the job early.
    fail_attempt(*w, id, attempt, "crash " + std::to_string(attempt));
    if (HasFatalFailure()) return;
  }
  const v1::Job failed = wait_for_state(*jobs_, id, v1::JOB_STATE_FAILED, seconds(10));
  EXPECT_EQ(failed.failure_reason(), "crash 4 (after 3 restarts)");
  ASSERT_EQ(failed.attempts_size(), 4);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(failed.attempts(i).state(), v1::JOB_STATE_FAILED);
    EXPECT_EQ(failed.attempts(i).restarted(), i < 3) << "attempt " << i + 1;
  }
  EXPECT_THAT(state_changes(id), HasSubstr("(restart 3 of 3) in 4 s\n"));
  const std::string metrics = "\n" + http_request(*coordinator_, "GET", "/metrics").body;
  EXPECT_THAT(metrics, HasSubstr("\nlomo_job_restarts_total 3\n"));
}

TEST_F(CoordinatorJobRestartTest, ThePermanentFailureOfABadSpecOrNonFiniteWeightsIsNotRestarted) {
  auto w = worker("w1");
  const std::string id = submit_ok(with_restarts(submit_request("non-finite"), 3));
  const v1::Assignment assignment = assignment_of(*w);
  ASSERT_TRUE(w->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(w->report_permanent_failure(
      id, 1, "training process exited with code 5: non-finite gradient at step 3"));
  const v1::Job failed = wait_for_state(*jobs_, id, v1::JOB_STATE_FAILED, seconds(10));
  EXPECT_EQ(failed.failure_reason(),
            "training process exited with code 5: non-finite gradient at step 3");
  ASSERT_EQ(failed.attempts_size(), 1);
  EXPECT_FALSE(failed.attempts(0).restarted());
  EXPECT_THAT(state_changes(id), Not(HasSubstr("restarting")));
}

TEST_F(CoordinatorJobRestartTest, TheSameFailureAtTheSameStepTwiceStopsTheJobEarly) {
  auto w = worker("w1");
  const std::string id = submit_ok(with_restarts(submit_request("deterministic crash"), 3));
  fail_attempt(*w, id, 1, "training process killed by SIGSEGV (crashed)");
  if (HasFatalFailure()) return;
  fail_attempt(*w, id, 2, "training process killed by SIGSEGV (crashed)");
  if (HasFatalFailure()) return;
  const v1::Job failed = wait_for_state(*jobs_, id, v1::JOB_STATE_FAILED, seconds(10));
  EXPECT_EQ(failed.failure_reason(),
            "training process killed by SIGSEGV (crashed) (failed the same way at step 0 in "
            "attempts 1 and 2; not restarted again, after 1 restart)");
  EXPECT_EQ(failed.attempts_size(), 2);
}

// A daemon runs each attempt in a new directory, so a trainer error naming a file of its output
// (here the chaos test's "training data changed" on resume) differs between attempts only there.
TEST_F(CoordinatorJobRestartTest, TheSameFailureInAnotherAttemptDirectoryStillStopsTheJobEarly) {
  auto w = worker("w1");
  const std::string id = submit_ok(with_restarts(submit_request("changed data"), 3));
  const auto reason = [&](int64_t attempt) {
    return "training process exited with code 1: lomo-worker train (rank 0): /var/lib/lomo/jobs/" +
           id + "/attempt-" + std::to_string(attempt) +
           "/out/checkpoints/step-00000018/lomo_trainer_state.json: the training data changed";
  };
  fail_attempt(*w, id, 1, reason(1));
  if (HasFatalFailure()) return;
  fail_attempt(*w, id, 2, reason(2));
  if (HasFatalFailure()) return;
  const v1::Job failed = wait_for_state(*jobs_, id, v1::JOB_STATE_FAILED, seconds(10));
  EXPECT_EQ(failed.failure_reason(), reason(2) +
                                         " (failed the same way at step 0 in attempts 1 and 2; "
                                         "not restarted again, after 1 restart)");
  EXPECT_EQ(failed.attempts_size(), 2);
}

TEST_F(CoordinatorJobRestartTest, CancellingAJobWaitingToRestartEndsItWithoutANewAttempt) {
  auto w = worker("w1");
  const std::string id = submit_ok(with_restarts(submit_request("cancel in backoff"), 3));
  fail_attempt(*w, id, 1, "lost");
  if (HasFatalFailure()) return;
  wait_for_state(*jobs_, id, v1::JOB_STATE_QUEUED, seconds(10));
  ASSERT_TRUE(cancel(*jobs_, id, nullptr).ok());
  EXPECT_EQ(wait_for_state(*jobs_, id, v1::JOB_STATE_CANCELLED, seconds(10)).attempt(), 1);
  EXPECT_FALSE(w->next_assignment(milliseconds(1500)).has_value())
      << "no attempt starts once its backoff ends";
}

TEST_F(CoordinatorJobRestartTest, AJobWaitingToRestartKeepsItsHistoryAcrossACoordinatorRestart) {
  auto w = worker("w1");
  const std::string id = submit_ok(with_restarts(submit_request("restart twice"), 3));
  fail_attempt(*w, id, 1, "lost its peers");
  if (HasFatalFailure()) return;
  wait_for_state(*jobs_, id, v1::JOB_STATE_QUEUED, seconds(10));
  coordinator_->kill9();
  w->disconnect();
  coordinator_ = std::make_unique<CoordinatorProcess>(
      ProcessOptions(dir_.path() / "data", heartbeat_timeout_seconds_));
  jobs_ = coordinator_->jobs();

  auto next = worker("w2");
  const v1::Assignment second = assignment_of(*next);
  EXPECT_EQ(second.job_id(), id);
  EXPECT_EQ(second.attempt(), 2);
  const v1::Job running = job_now(id);
  ASSERT_EQ(running.attempts_size(), 1);
  EXPECT_EQ(running.attempts(0).reason(), "lost its peers");
  EXPECT_TRUE(running.attempts(0).restarted());
}

TEST_F(CoordinatorJobRestartTest, AGangWhoseRankLosesItsWorkerIsRestartedWhole) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(with_restarts(gang_request("gang", 2), 3));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_RUNNING));
  b->disconnect();  // rank 1's worker dies

  const auto stop = a->next_of(v1::CoordinatorMessage::kCancel, seconds(20));
  ASSERT_TRUE(stop.has_value()) << "rank 0 is told to stop";
  EXPECT_EQ(stop->cancel().attempt(), 1);
  const v1::Job queued = job_now(id);
  EXPECT_EQ(queued.state(), v1::JOB_STATE_QUEUED);
  ASSERT_EQ(queued.attempts_size(), 1);
  EXPECT_THAT(queued.attempts(0).reason(), StartsWith("rank 1: worker w-b missed heartbeats"));
  EXPECT_EQ(queued.attempts(0).assignments_size(), 2);
  EXPECT_THAT(state_changes(id),
              HasSubstr("restarting after attempt 1 failed: rank 1: worker w-b missed heartbeats"));

  // Rank 0 stops; with a new worker in place of the dead one the whole gang runs attempt 2.
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_CANCELLED, "cancelled"));
  auto c = worker("w-c");
  const v1::Assignment first = assignment_of(*a);
  const v1::Assignment second = assignment_of(*c);
  EXPECT_EQ(first.attempt(), 2);
  EXPECT_EQ(second.attempt(), 2);
  for (TestWorker* w : {a.get(), c.get()}) {
    ASSERT_TRUE(w->report(id, 2, v1::JOB_STATE_RUNNING));
    ASSERT_TRUE(w->report(id, 2, v1::JOB_STATE_SUCCEEDED));
  }
  const v1::Job done = wait_for_state(*jobs_, id, v1::JOB_STATE_SUCCEEDED, seconds(10));
  ASSERT_EQ(done.attempts_size(), 2);
  EXPECT_EQ(done.attempts(1).state(), v1::JOB_STATE_SUCCEEDED);
}

// The status a rank's daemon sends when its trainer's collective with `peer` failed.
v1::JobStatusUpdate peer_failure(const std::string& id, int64_t attempt, int peer) {
  v1::JobStatusUpdate status;
  status.set_job_id(id);
  status.set_attempt(attempt);
  status.set_state(v1::JOB_STATE_FAILED);
  status.set_reason(
      "training process exited with code 1: collective all_reduce failed (peer rank " +
      std::to_string(peer) + "): Connection closed by peer [127.0.0.1]:41234");
  status.set_peer_rank(peer);
  return status;
}

// A killed rank's peers fail at once in their collectives, and their reports may arrive first: the
// attempt waits for the killed rank's own report and records the cause, not the symptom (the chaos
// test once saw every crash recorded as its peer's "collective all_reduce failed").
TEST_F(CoordinatorJobRestartTest, ARankThatLostItsPeerWaitsForThePeersReportWhichNamesTheCause) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(with_restarts(gang_request("cause", 2), 3));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(peer_failure(id, 1, 0)));
  ASSERT_TRUE(wait_until(
      [&] {
        for (const v1::JobEvent& event : all_events(*jobs_, id)) {
          if (event.has_log() && event.log().text().find("rank 1 (worker w-b): training process "
                                                         "exited with code 1") == 0) {
            return true;
          }
        }
        return false;
      },
      seconds(10)))
      << "rank 1's end is recorded while the attempt waits";
  EXPECT_EQ(job_now(id).state(), v1::JOB_STATE_RUNNING) << "the attempt waits for rank 0";
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_FAILED, "training process killed by SIGKILL"));
  const v1::Job queued = wait_for_state(*jobs_, id, v1::JOB_STATE_QUEUED, seconds(10));
  ASSERT_EQ(queued.attempts_size(), 1);
  EXPECT_EQ(queued.attempts(0).reason(), "rank 0 (worker w-a): training process killed by SIGKILL");
  EXPECT_THAT(history(id),
              HasSubstr("(peer rank 0): Connection closed by peer [127.0.0.1]:41234; the "
                        "attempt waits up to 5 s for rank 0's own report, the likely "
                        "cause\n"));
}

// A peer that never reports (its daemon died with it) does not hold the attempt beyond the grace:
// it ends with the report it has, naming the silent peer.
TEST_F(CoordinatorJobRestartTest, APeerFailureWhosePeerNeverReportsEndsTheAttemptAfterTheGrace) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(with_restarts(gang_request("silent", 2), 3));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_RUNNING));
  const auto reported = std::chrono::steady_clock::now();
  ASSERT_TRUE(b->report(peer_failure(id, 1, 0)));
  ASSERT_TRUE(a->next_of(v1::CoordinatorMessage::kCancel, seconds(20)).has_value())
      << "rank 0 is told to stop once the attempt ends";
  EXPECT_GE(std::chrono::steady_clock::now() - reported, milliseconds(4500))
      << "the attempt waited for rank 0's report";
  const v1::Job queued = job_now(id);
  EXPECT_EQ(queued.state(), v1::JOB_STATE_QUEUED);
  ASSERT_EQ(queued.attempts_size(), 1);
  EXPECT_EQ(queued.attempts(0).reason(),
            "rank 0 (worker w-a): no report of its own within 5 s; rank 1 (worker w-b): " +
                peer_failure(id, 1, 0).reason());
}

// A gang restarted on other workers that fails at the same step with the same rank's same reason
// meets the same cause: the worker names in the reasons do not hide the repeat.
TEST_F(CoordinatorJobRestartTest, TheSameGangFailureOnOtherWorkersStillStopsTheJobEarly) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(with_restarts(gang_request("repeats", 2), 3));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_FAILED, "out of memory at step 0"));
  ASSERT_TRUE(b->next_of(v1::CoordinatorMessage::kCancel, seconds(20)).has_value());
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_CANCELLED, "cancelled"));
  // w-a goes away and w-c takes its place: attempt 2 runs rank 0 on another worker than w-a.
  a->disconnect();
  auto c = worker("w-c");
  std::map<int, TestWorker*> ranks;
  for (TestWorker* w : {b.get(), c.get()}) {
    const v1::Assignment next = assignment_of(*w);
    ASSERT_EQ(next.attempt(), 2);
    ranks[next.rank()] = w;
  }
  ASSERT_EQ(ranks.size(), 2u);
  const std::string rank0_worker = ranks[0] == b.get() ? "w-b" : "w-c";
  ASSERT_TRUE(ranks[0]->report(id, 2, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(ranks[0]->report(id, 2, v1::JOB_STATE_FAILED, "out of memory at step 0"));
  const v1::Job failed = wait_for_state(*jobs_, id, v1::JOB_STATE_FAILED, seconds(10));
  EXPECT_EQ(failed.failure_reason(), "rank 0 (worker " + rank0_worker +
                                         "): out of memory at step 0 (failed the same way at step "
                                         "0 in attempts 1 and 2; not restarted again, after 1 "
                                         "restart)");
}

// Rank 0 may still hold checkpoints its trainer wrote before a peer failed (uploads wait while the
// coordinator is away): they are committed while the job waits for its next attempt, so that
// attempt resumes from them; once the next attempt is assigned, the ended one's are refused.
TEST_F(CoordinatorJobRestartTest,
       RankZerosCheckpointFromBeforeAPeerFailedIsCommittedUntilTheNextAttempt) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(with_restarts(gang_request("late", 2), 3));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_FAILED, "training process killed by SIGKILL"));
  ASSERT_TRUE(a->next_of(v1::CoordinatorMessage::kCancel, seconds(20)).has_value())
      << "rank 0 is told to stop";
  ASSERT_EQ(job_now(id).state(), v1::JOB_STATE_QUEUED);

  const std::map<std::string, std::string> files = {{"model.safetensors", std::string(900, 'w')},
                                                    {"lomo_trainer_state.json", "{}"}};
  const auto late = a->upload_checkpoint(id, 1, 7, files);
  ASSERT_TRUE(late.has_value());
  EXPECT_TRUE(late->committed()) << late->error();
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::ListCheckpointsRequest request;
  request.set_job_id(id);
  v1::ListCheckpointsResponse listed;
  ASSERT_TRUE(jobs_->ListCheckpoints(&context, request, &listed).ok());
  ASSERT_EQ(listed.checkpoints_size(), 1);
  EXPECT_EQ(listed.checkpoints(0).step(), 7);

  // Rank 1's worker stays a rank-1 worker: it never uploads, even now.
  const auto from_rank_one = b->upload_checkpoint(id, 1, 8, files);
  ASSERT_TRUE(from_rank_one.has_value());
  EXPECT_FALSE(from_rank_one->committed());

  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_CANCELLED, "cancelled"));
  const v1::Assignment next = assignment_of(*a);
  ASSERT_EQ(next.attempt(), 2);
  const auto stale = a->upload_checkpoint(id, 1, 9, files);
  ASSERT_TRUE(stale.has_value());
  EXPECT_FALSE(stale->committed()) << "attempt 1's upload after attempt 2 was assigned";
}

}  // namespace
}  // namespace lomo::server::testing
