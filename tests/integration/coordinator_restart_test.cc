// Restart safety: kill -9 the coordinator and start it again on the same data directory. Nothing
// submitted, recorded or committed is lost; a worker that comes back keeps its job, one that does
// not fails it after the heartbeat timeout.
#include <gmock/gmock.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <gtest/gtest.h>

#include <map>

#include "tests/integration/coordinator_harness.h"

namespace lomo::server::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::HasSubstr;

constexpr double kHeartbeatTimeout = 3.0;

// Map fields (a Struct's keys) serialize in no fixed order unless asked to.
std::string deterministic(const google::protobuf::Message& message) {
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream stream(&bytes);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    message.SerializeToCodedStream(&coded);
  }
  return bytes;
}

class CoordinatorRestartTest : public ::testing::Test {
 protected:
  void start() {
    coordinator_ = std::make_unique<CoordinatorProcess>(
        ProcessOptions(dir_.path() / "data", kHeartbeatTimeout));
    jobs_ = coordinator_->jobs();
  }
  void SetUp() override { start(); }
  void TearDown() override {
    if (HasFailure() && coordinator_) std::cerr << "coordinator log:\n" << coordinator_->log();
  }

  v1::Job submit_ok(const std::string& name, int64_t priority = 0) {
    v1::Job job;
    const grpc::Status status = submit(*jobs_, submit_request(name, priority), &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }

  // Every job with its events and checkpoints, as the API shows them.
  std::map<std::string, std::string> snapshot(const std::vector<std::string>& ids) {
    std::map<std::string, std::string> state;
    for (const std::string& id : ids) {
      v1::Job job;
      EXPECT_TRUE(get(*jobs_, id, &job).ok()) << id;
      // Not stored: computed from the workers connected at the time of asking.
      job.clear_wait_reason();
      std::string text = deterministic(job);
      for (const v1::JobEvent& event : all_events(*jobs_, id)) text += deterministic(event);
      grpc::ClientContext context;
      context.set_deadline(deadline_in(10));
      v1::ListCheckpointsRequest request;
      request.set_job_id(id);
      v1::ListCheckpointsResponse checkpoints;
      EXPECT_TRUE(jobs_->ListCheckpoints(&context, request, &checkpoints).ok());
      state[id] = text + deterministic(checkpoints);
    }
    return state;
  }

  TempDir dir_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
};

TEST_F(CoordinatorRestartTest, KillNineLosesNoJobEventOrCheckpoint) {
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(submit_ok("job-" + std::to_string(i), i).id());
  TestWorker worker(coordinator_->channel());
  worker.register_as("w-doomed");
  worker.start_heartbeats(milliseconds(200));
  const auto assignment = worker.next_assignment(seconds(5));
  ASSERT_TRUE(assignment.has_value());
  const std::string running = assignment->job_id();
  EXPECT_EQ(running, ids.back()) << "highest priority first";
  worker.set_current(running, 1);
  ASSERT_TRUE(worker.report(running, 1, v1::JOB_STATE_RUNNING));
  for (int step = 1; step <= 30; ++step) {
    ASSERT_TRUE(worker.send_metrics(running, 1, step, 3.0 - step * 0.01, 500));
  }
  const auto ack = worker.upload_checkpoint(running, 1, 30, {{"model.safetensors", "weights"}});
  ASSERT_TRUE(ack.has_value() && ack->committed());  // also: every earlier message was handled
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::CancelJobRequest cancel;
  cancel.set_job_id(ids[0]);
  v1::CancelJobResponse cancelled;
  ASSERT_TRUE(jobs_->CancelJob(&context, cancel, &cancelled).ok());

  const std::map<std::string, std::string> before = snapshot(ids);
  coordinator_->kill9();
  worker.disconnect();
  start();
  EXPECT_EQ(snapshot(ids), before) << "every job, event and checkpoint as it was";

  // The running job's worker never returns: it fails with the restart reason after the timeout.
  const v1::Job failed = wait_for_state(*jobs_, running, v1::JOB_STATE_FAILED, seconds(30));
  ASSERT_EQ(failed.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(failed.failure_reason(),
            "coordinator restarted and worker w-doomed did not reconnect within the re-attach "
            "window (3.0 s)");
  // Queued jobs are still queued, and served in priority order by a new worker.
  TestWorker fresh(coordinator_->channel());
  fresh.register_as("w-fresh");
  fresh.heartbeat();  // it runs nothing: ready for a job
  const auto next = fresh.next_assignment(seconds(5));
  ASSERT_TRUE(next.has_value());
  EXPECT_EQ(next->job_id(), ids[3]);
}

TEST_F(CoordinatorRestartTest, AWorkerThatReconnectsAfterARestartKeepsItsJob) {
  const v1::Job kept = submit_ok("kept");
  const v1::Job lost = submit_ok("lost");
  TestWorker returning(coordinator_->channel());
  returning.register_as("w-returns");
  returning.heartbeat();  // it runs nothing: ready for a job
  const auto first = returning.next_assignment(seconds(5));
  ASSERT_TRUE(first.has_value());
  ASSERT_EQ(first->job_id(), kept.id());
  TestWorker vanishing(coordinator_->channel());
  vanishing.register_as("w-vanishes");
  vanishing.heartbeat();  // it runs nothing: ready for a job
  const auto second = vanishing.next_assignment(seconds(5));
  ASSERT_TRUE(second.has_value());
  ASSERT_EQ(second->job_id(), lost.id());
  ASSERT_TRUE(returning.report(kept.id(), 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(vanishing.report(lost.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, kept.id(), v1::JOB_STATE_RUNNING, seconds(30));
  wait_for_state(*jobs_, lost.id(), v1::JOB_STATE_RUNNING, seconds(30));

  coordinator_->kill9();
  returning.disconnect();
  vanishing.disconnect();
  start();

  TestWorker back(coordinator_->channel());
  back.register_as("w-returns");
  back.set_current(kept.id(), 1);
  back.start_heartbeats(milliseconds(200));
  const v1::Job failed = wait_for_state(*jobs_, lost.id(), v1::JOB_STATE_FAILED, seconds(30));
  EXPECT_THAT(failed.failure_reason(),
              HasSubstr("coordinator restarted and worker w-vanishes did not reconnect"));
  v1::Job job;
  ASSERT_TRUE(get(*jobs_, kept.id(), &job).ok());
  EXPECT_EQ(job.state(), v1::JOB_STATE_RUNNING) << "its worker came back with it";
  EXPECT_EQ(job.worker_id(), "w-returns");
  ASSERT_TRUE(back.report(kept.id(), 1, v1::JOB_STATE_SUCCEEDED));
  EXPECT_EQ(wait_for_state(*jobs_, kept.id(), v1::JOB_STATE_SUCCEEDED, seconds(30)).state(),
            v1::JOB_STATE_SUCCEEDED);
}

TEST_F(CoordinatorRestartTest, EveryRankOfAGangIsWaitedForAfterARestart) {
  // Two gangs of two run when the coordinator is killed; rank 1 of "kept" has finished already.
  // After the restart, rank 0 of "kept" comes back and the job runs on (its finished rank is not
  // waited for); of "lost", only rank 0 does: the job fails naming rank 1, and rank 0 is told to
  // stop.
  std::vector<std::unique_ptr<TestWorker>> before;
  for (const char* id : {"w-k0", "w-k1", "w-l0", "w-l1"}) {
    before.push_back(std::make_unique<TestWorker>(coordinator_->channel()));
    before.back()->register_as(id);
    before.back()->heartbeat();  // it runs nothing: ready for a job
  }
  v1::Job kept, lost;
  ASSERT_TRUE(submit(*jobs_, gang_request("kept", 2), &kept).ok());
  ASSERT_TRUE(submit(*jobs_, gang_request("lost", 2), &lost).ok());
  for (int i = 0; i < 4; ++i) {
    const auto assignment = before[i]->next_assignment(seconds(5));
    ASSERT_TRUE(assignment.has_value());
    EXPECT_EQ(assignment->job_id(), i < 2 ? kept.id() : lost.id());
    EXPECT_EQ(assignment->rank(), i % 2);
    ASSERT_TRUE(before[i]->report(assignment->job_id(), 1, v1::JOB_STATE_RUNNING));
  }
  wait_for_state(*jobs_, kept.id(), v1::JOB_STATE_RUNNING, seconds(30));
  wait_for_state(*jobs_, lost.id(), v1::JOB_STATE_RUNNING, seconds(30));
  ASSERT_TRUE(before[1]->report(kept.id(), 1, v1::JOB_STATE_SUCCEEDED));
  ASSERT_TRUE(wait_until(
      [&] {
        for (const v1::JobEvent& event : all_events(*jobs_, kept.id())) {
          if (event.log().text() == "rank 1 (worker w-k1): finished") return true;
        }
        return false;
      },
      seconds(10)));

  coordinator_->kill9();
  for (auto& worker : before) worker->disconnect();
  start();

  std::vector<std::unique_ptr<TestWorker>> back;
  for (const auto& [id, job] : {std::pair{"w-k0", kept.id()}, std::pair{"w-l0", lost.id()}}) {
    back.push_back(std::make_unique<TestWorker>(coordinator_->channel()));
    back.back()->register_as(id);
    back.back()->set_current(job, 1);
    back.back()->start_heartbeats(milliseconds(200));
  }
  const v1::Job failed = wait_for_state(*jobs_, lost.id(), v1::JOB_STATE_FAILED, seconds(30));
  EXPECT_EQ(failed.failure_reason(),
            "rank 1: coordinator restarted and worker w-l1 did not reconnect within the re-attach "
            "window (3.0 s)");
  const auto cancel = back[1]->next_of(v1::CoordinatorMessage::kCancel, seconds(5));
  ASSERT_TRUE(cancel.has_value());
  EXPECT_EQ(cancel->cancel().job_id(), lost.id());

  v1::Job job;
  ASSERT_TRUE(get(*jobs_, kept.id(), &job).ok());
  EXPECT_EQ(job.state(), v1::JOB_STATE_RUNNING) << "its running rank's worker came back with it";
  ASSERT_EQ(job.assignments_size(), 2);
  EXPECT_EQ(job.assignments(1).worker_id(), "w-k1");
  ASSERT_TRUE(back[0]->report(kept.id(), 1, v1::JOB_STATE_SUCCEEDED));
  EXPECT_EQ(wait_for_state(*jobs_, kept.id(), v1::JOB_STATE_SUCCEEDED, seconds(30)).state(),
            v1::JOB_STATE_SUCCEEDED);
}

// Jobs that ended are not restored, so after a restart the coordinator does not know that a worker
// is still stopping a rank of a gang that failed. That worker registers and heartbeats the old
// attempt: it is told to stop it and gets no job until its heartbeat names nothing (its daemon
// would refuse the job as busy, failing it); then it gets the next job at once.
TEST_F(CoordinatorRestartTest, AWorkerStillStoppingARankOfAnEndedGangGetsNoJobUntilItStops) {
  TestWorker a(coordinator_->channel());
  TestWorker b(coordinator_->channel());
  for (auto [w, id] : {std::pair{&a, "w-a"}, std::pair{&b, "w-b"}}) {
    w->register_as(id);
    w->heartbeat();
  }
  v1::Job gang;
  ASSERT_TRUE(submit(*jobs_, gang_request("fails", 2), &gang).ok());
  ASSERT_TRUE(a.next_assignment(seconds(5)).has_value());
  ASSERT_TRUE(b.next_assignment(seconds(5)).has_value());
  ASSERT_TRUE(a.report(gang.id(), 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b.report(gang.id(), 1, v1::JOB_STATE_FAILED, "out of memory"));
  wait_for_state(*jobs_, gang.id(), v1::JOB_STATE_FAILED, seconds(30));
  ASSERT_TRUE(a.next_of(v1::CoordinatorMessage::kCancel, seconds(5)).has_value());

  coordinator_->kill9();
  a.disconnect();
  b.disconnect();
  start();
  const v1::Job innocent = submit_ok("innocent");

  TestWorker back(coordinator_->channel());
  back.set_current(gang.id(), 1);  // rank 0 is still stopping
  back.register_as("w-a");
  back.start_heartbeats(milliseconds(200));
  const auto cancel = back.next_of(v1::CoordinatorMessage::kCancel, seconds(5));
  ASSERT_TRUE(cancel.has_value()) << "the old attempt is told to stop";
  EXPECT_EQ(cancel->cancel().job_id(), gang.id());
  EXPECT_FALSE(back.next_assignment(seconds(1)).has_value()) << "it still runs the old attempt";
  v1::Job job;
  ASSERT_TRUE(get(*jobs_, innocent.id(), &job).ok());
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job.wait_reason(), "waiting for 1 idle cpu worker, 0 idle");

  back.set_current("", 0);  // it stopped
  const auto assignment = back.next_assignment(seconds(5));
  ASSERT_TRUE(assignment.has_value());
  EXPECT_EQ(assignment->job_id(), innocent.id());
}

TEST_F(CoordinatorRestartTest, ACancelRequestSurvivesARestart) {
  const v1::Job submitted = submit_ok("cancel-across-restart");
  TestWorker worker(coordinator_->channel());
  worker.register_as("w-slow");
  worker.heartbeat();  // it runs nothing: ready for a job
  ASSERT_TRUE(worker.next_assignment(seconds(5)).has_value());
  ASSERT_TRUE(worker.report(submitted.id(), 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_RUNNING, seconds(30));
  coordinator_->kill9();
  worker.disconnect();
  start();

  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::CancelJobRequest cancel;
  cancel.set_job_id(submitted.id());
  v1::CancelJobResponse response;
  ASSERT_TRUE(jobs_->CancelJob(&context, cancel, &response).ok());
  coordinator_->kill9();
  start();

  // The worker comes back still running the job: it is told to stop.
  TestWorker back(coordinator_->channel());
  back.register_as("w-slow");
  back.set_current(submitted.id(), 1);
  back.start_heartbeats(milliseconds(200));
  const auto message = back.next_of(v1::CoordinatorMessage::kCancel, seconds(5));
  ASSERT_TRUE(message.has_value());
  EXPECT_EQ(message->cancel().job_id(), submitted.id());
  ASSERT_TRUE(back.report(submitted.id(), 1, v1::JOB_STATE_CANCELLED));
  EXPECT_EQ(wait_for_state(*jobs_, submitted.id(), v1::JOB_STATE_CANCELLED, seconds(30)).state(),
            v1::JOB_STATE_CANCELLED);
}

}  // namespace
}  // namespace lomo::server::testing
