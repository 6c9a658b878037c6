// Gangs against a real lomo-coordinator: test workers on real gRPC streams run the ranks of
// data-parallel jobs. A job of world size N is placed all-or-nothing on N workers (rank 0 the one
// idle longest), waits with a visible reason, counts only rank 0's metrics and checkpoints, fails
// as a whole when one rank fails or dies (the other ranks are told to stop and stay busy until they
// confirm), and its ranks meet through the rendezvous key-value service of their attempt.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/integration/coordinator_harness.h"
#include "tests/integration/coordinator_test_fixture.h"

namespace lomo::server::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::StartsWith;

constexpr double kHeartbeatTimeout = 2.0;

class CoordinatorGangTest : public CoordinatorTest {
 protected:
  CoordinatorGangTest() : CoordinatorTest(kHeartbeatTimeout) {}

  // FetchCheckpoint as `worker_id`: the status and the step the first message names (0: none).
  grpc::Status fetch(const std::string& worker_id, const std::string& job_id, int64_t attempt,
                     int64_t* step) {
    *step = 0;
    grpc::ClientContext context;
    context.set_deadline(deadline_in(10));
    v1::FetchCheckpointRequest request;
    request.set_worker_id(worker_id);
    request.set_job_id(job_id);
    request.set_attempt(attempt);
    auto reader =
        v1::WorkerService::NewStub(coordinator_->channel())->FetchCheckpoint(&context, request);
    v1::FetchCheckpointResponse response;
    for (bool first = true; reader->Read(&response); first = false) {
      if (first) *step = response.checkpoint().step();
    }
    return reader->Finish();
  }
};

std::vector<std::pair<int, std::string>> ranks_of(const v1::Job& job) {
  std::vector<std::pair<int, std::string>> ranks;
  for (const auto& assignment : job.assignments()) {
    ranks.emplace_back(assignment.rank(), assignment.worker_id());
  }
  return ranks;
}

TEST_F(CoordinatorGangTest, TwoRanksRunOneJobAndOnlyRankZeroReportsProgressAndCheckpoints) {
  auto a = worker("w-a");  // idle longest: rank 0
  auto b = worker("w-b");
  const v1::Job submitted = submit_job_ok(gang_request("pair", 2));
  const std::string& id = submitted.id();
  const v1::Assignment first = assignment_of(*a);
  const v1::Assignment second = assignment_of(*b);
  EXPECT_EQ(first.job_id(), id);
  EXPECT_EQ(second.job_id(), id);
  EXPECT_EQ(first.rank(), 0);
  EXPECT_EQ(second.rank(), 1);
  EXPECT_EQ(first.world_size(), 2);
  EXPECT_EQ(second.world_size(), 2);
  EXPECT_EQ(first.attempt(), 1);
  EXPECT_EQ(second.attempt(), 1);
  EXPECT_EQ(first.canonical_spec(), second.canonical_spec());

  v1::Job job = wait_for_state(*jobs_, id, v1::JOB_STATE_ASSIGNED, seconds(10));
  EXPECT_EQ(job.worker_id(), "w-a");
  EXPECT_THAT(ranks_of(job), ElementsAre(std::pair{0, "w-a"}, std::pair{1, "w-b"}));
  EXPECT_THAT(job.wait_reason(), IsEmpty());

  // The first rank to say RUNNING makes the job RUNNING.
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_RUNNING));
  wait_for_state(*jobs_, id, v1::JOB_STATE_RUNNING, seconds(10));
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));

  // Rank 1's metrics do not move the progress; its checkpoint upload is refused by rule (the ack
  // also proves that everything it sent before was handled).
  ASSERT_TRUE(b->send_metrics(id, 1, 10, 9.0, 1));
  const auto refused = b->upload_checkpoint(id, 1, 10, {{"model.safetensors", "rank 1"}});
  ASSERT_TRUE(refused.has_value());
  EXPECT_FALSE(refused->committed());
  EXPECT_THAT(refused->error(), HasSubstr("only rank 0 uploads checkpoints"));
  EXPECT_THAT(refused->error(), HasSubstr("worker w-b runs rank 1"));
  EXPECT_EQ(job_now(id).progress().step(), 0);

  ASSERT_TRUE(a->send_metrics(id, 1, 5, 2.5, 1000));
  const auto ack = a->upload_checkpoint(id, 1, 5, {{"model.safetensors", "rank 0"}});
  ASSERT_TRUE(ack.has_value());
  EXPECT_TRUE(ack->committed()) << ack->error();
  job = job_now(id);
  EXPECT_EQ(job.progress().step(), 5);
  EXPECT_DOUBLE_EQ(job.progress().loss(), 2.5);
  // Every rank of the attempt may fetch the checkpoint to resume from.
  int64_t step = 0;
  EXPECT_TRUE(fetch("w-b", id, 1, &step).ok());
  EXPECT_EQ(step, 5);

  // The events say which rank wrote what.
  std::string events = history(id);
  EXPECT_THAT(events, HasSubstr("rank 1 (worker w-b): step 10\n"));
  EXPECT_THAT(events, HasSubstr("rank 0 (worker w-a): step 5\n"));
  EXPECT_THAT(events, HasSubstr("running: rank 1 (worker w-b) started first\n"));
  EXPECT_THAT(events, HasSubstr("rank 0 (worker w-a): running\n"));

  // Rank 1 finishes first: the job runs on, and rank 1's worker is free for other work.
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_SUCCEEDED));
  const v1::Job single = submit_job_ok(submit_request("after rank 1"));
  const v1::Assignment next = assignment_of(*b);
  EXPECT_EQ(next.job_id(), single.id());
  EXPECT_EQ(next.world_size(), 1);
  EXPECT_EQ(job_now(id).state(), v1::JOB_STATE_RUNNING);
  EXPECT_THAT(history(id), HasSubstr("rank 1 (worker w-b): finished\n"));

  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_SUCCEEDED));
  job = wait_for_state(*jobs_, id, v1::JOB_STATE_SUCCEEDED, seconds(10));
  EXPECT_THAT(history(id), HasSubstr("every rank (2) finished; last rank 0 (worker w-a)\n"));
  EXPECT_THAT(ranks_of(job), ElementsAre(std::pair{0, "w-a"}, std::pair{1, "w-b"}));
}

TEST_F(CoordinatorGangTest, GangsWaitWithAReasonAndTwoGangsOnThreeWorkersRunInOrder) {
  auto w1 = worker("w1");
  auto w2 = worker("w2");
  auto w3 = worker("w3");
  const std::string first = submit_ok(gang_request("first", 2));
  const std::string second = submit_ok(gang_request("second", 2));
  const std::string small = submit_ok(submit_request("small"));
  EXPECT_EQ(assignment_of(*w1).rank(), 0);
  EXPECT_EQ(assignment_of(*w2).rank(), 1);

  // The second gang takes no worker while it waits, and the small job waits behind it even
  // though a worker is idle (strict order: no backfill).
  EXPECT_EQ(job_now(second).wait_reason(), "waiting for 2 idle cpu workers, 1 idle");
  EXPECT_EQ(job_now(small).wait_reason(), "waiting behind job " + second +
                                              " (priority 0), which needs 2 idle cpu workers, 1 "
                                              "idle");
  EXPECT_FALSE(w3->next_assignment(milliseconds(300)).has_value());
  grpc::ClientContext context;
  context.set_deadline(deadline_in(10));
  v1::ListJobsRequest list;
  list.add_states(v1::JOB_STATE_QUEUED);
  v1::ListJobsResponse queued;
  ASSERT_TRUE(jobs_->ListJobs(&context, list, &queued).ok());
  ASSERT_EQ(queued.jobs_size(), 2);
  EXPECT_EQ(queued.jobs(1).wait_reason(), "waiting for 2 idle cpu workers, 1 idle");

  // The first gang ends (rank 1 first): the second takes the longest-idle workers, w3 and w2,
  // and the small job the last one.
  ASSERT_TRUE(w2->report(first, 1, v1::JOB_STATE_SUCCEEDED));
  // The two reports travel on different streams: w1's waits until w2's is taken, so that w2 is
  // the one idle longer.
  ASSERT_TRUE(wait_until(
      [&] { return history(first).find("rank 1 (worker w2): finished") != std::string::npos; },
      seconds(10)))
      << history(first);
  ASSERT_TRUE(w1->report(first, 1, v1::JOB_STATE_SUCCEEDED));
  wait_for_state(*jobs_, first, v1::JOB_STATE_SUCCEEDED, seconds(10));
  const v1::Assignment rank0 = assignment_of(*w3);
  const v1::Assignment rank1 = assignment_of(*w2);
  EXPECT_EQ(rank0.job_id(), second);
  EXPECT_EQ(rank0.rank(), 0);
  EXPECT_EQ(rank1.rank(), 1);
  EXPECT_EQ(assignment_of(*w1).job_id(), small);
  ASSERT_TRUE(w3->report(second, 1, v1::JOB_STATE_SUCCEEDED));
  ASSERT_TRUE(w2->report(second, 1, v1::JOB_STATE_SUCCEEDED));
  const v1::Job done = wait_for_state(*jobs_, second, v1::JOB_STATE_SUCCEEDED, seconds(10));
  EXPECT_THAT(ranks_of(done), ElementsAre(std::pair{0, "w3"}, std::pair{1, "w2"}));
  EXPECT_THAT(done.wait_reason(), IsEmpty());
}

TEST_F(CoordinatorGangTest, ARankFailingFailsTheJobAndTheOtherRankIsCancelledButStaysBusy) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(gang_request("fails", 2));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_FAILED, "out of memory"));
  const v1::Job failed = wait_for_state(*jobs_, id, v1::JOB_STATE_FAILED, seconds(10));
  EXPECT_EQ(failed.failure_reason(), "rank 1 (worker w-b): out of memory");
  const auto cancel = a->next_of(v1::CoordinatorMessage::kCancel, seconds(10));
  ASSERT_TRUE(cancel.has_value()) << "the surviving rank is told to stop";
  EXPECT_EQ(cancel->cancel().job_id(), id);
  EXPECT_EQ(cancel->cancel().attempt(), 1);

  // w-b reported its end and is free; w-a is busy until it confirms.
  const std::string next1 = submit_ok(submit_request("next-1"));
  const std::string next2 = submit_ok(submit_request("next-2"));
  EXPECT_EQ(assignment_of(*b).job_id(), next1);
  EXPECT_EQ(job_now(next2).wait_reason(), "waiting for 1 idle cpu worker, 0 idle");
  EXPECT_FALSE(a->next_assignment(milliseconds(300)).has_value());
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_CANCELLED, "cancelled"));
  EXPECT_EQ(assignment_of(*a).job_id(), next2);
  EXPECT_THAT(history(id),
              HasSubstr("rank 0 (worker w-a): CANCELLED after the job ended: cancelled\n"));
  EXPECT_EQ(job_now(id).state(), v1::JOB_STATE_FAILED) << "a late rank changes nothing";
}

TEST_F(CoordinatorGangTest, ARankWhoseWorkerDiesFailsTheJob) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(gang_request("loses a rank", 2));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));
  b->disconnect();  // rank 1's worker crashes and never returns
  const v1::Job failed = wait_for_state(*jobs_, id, v1::JOB_STATE_FAILED, seconds(20));
  EXPECT_THAT(failed.failure_reason(), StartsWith("rank 1: worker w-b missed heartbeats for "));
  EXPECT_TRUE(a->next_of(v1::CoordinatorMessage::kCancel, seconds(10)).has_value());
}

TEST_F(CoordinatorGangTest, CancellingAGangCancelsEveryRank) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(gang_request("cancelled", 2));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(cancel(*jobs_, id, nullptr).ok());
  for (TestWorker* w : {a.get(), b.get()}) {
    const auto message = w->next_of(v1::CoordinatorMessage::kCancel, seconds(10));
    ASSERT_TRUE(message.has_value());
    EXPECT_EQ(message->cancel().job_id(), id);
  }
  EXPECT_THAT(history(id),
              HasSubstr("cancellation requested; waiting for workers w-a, w-b to stop\n"));
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_CANCELLED));
  wait_for_state(*jobs_, id, v1::JOB_STATE_CANCELLED, seconds(10));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_CANCELLED));
  ASSERT_TRUE(wait_until(
      [&] { return history(id).find("rank 1 (worker w-b): CANCELLED after") != std::string::npos; },
      seconds(10)));
  EXPECT_THAT(history(id), HasSubstr("cancelled by request; rank 0 (worker w-a) stopped\n"));
}

// A rank may fail rather than confirm a cancel: rank 0 stops first and rank 1's collective then
// fails ("rank 0 closed its communicator"). With the cancel pending, that end is the cancel taking
// effect: the job is CANCELLED, the rank's words kept as the detail, and no failure is recorded.
TEST_F(CoordinatorGangTest, CancellingAGangEndsCancelledEvenWhenARankFailsWhileStopping) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(gang_request("cancel-then-fail", 2));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(cancel(*jobs_, id, nullptr).ok());
  ASSERT_TRUE(b->next_of(v1::CoordinatorMessage::kCancel, seconds(10)).has_value());
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_FAILED, "rank 0 closed its communicator"));
  const v1::Job ended = wait_for_state(*jobs_, id, v1::JOB_STATE_CANCELLED, seconds(10));
  EXPECT_THAT(ended.failure_reason(), IsEmpty());
  EXPECT_THAT(history(id), HasSubstr("cancelled by request; rank 1 (worker w-b): rank 0 closed "
                                     "its communicator\n"));
}

// A stopping rank's heartbeat may say it runs nothing before its terminal status arrives (the
// daemon stops naming the attempt once it has reported): the worker is freed then, and the status
// that follows is still recorded on the job that ended.
TEST_F(CoordinatorGangTest, ALateRankEndIsRecordedEvenAfterItsHeartbeatFreedTheWorker) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(gang_request("late end", 2));
  assignment_of(*a);
  assignment_of(*b);
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_RUNNING));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_FAILED, "out of memory"));
  wait_for_state(*jobs_, id, v1::JOB_STATE_FAILED, seconds(10));
  ASSERT_TRUE(a->next_of(v1::CoordinatorMessage::kCancel, seconds(10)).has_value());
  // One stream delivers in order: rank 0 still runs, then has stopped (its heartbeat names
  // nothing, which frees its worker), then its terminal status comes.
  a->stop_heartbeats();
  ASSERT_TRUE(a->heartbeat(id, 1));
  a->set_current("", 0);
  ASSERT_TRUE(a->heartbeat());
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_CANCELLED, "cancelled"));
  EXPECT_TRUE(wait_until(
      [&] {
        return history(id).find(
                   "rank 0 (worker w-a): CANCELLED after the job ended: cancelled\n") !=
               std::string::npos;
      },
      seconds(10)))
      << history(id);
  EXPECT_EQ(job_now(id).state(), v1::JOB_STATE_FAILED) << "a late rank changes nothing";
  // Both workers are free: two jobs go to them.
  a->start_heartbeats(milliseconds(200));
  const std::string next1 = submit_ok(submit_request("next-1"));
  const std::string next2 = submit_ok(submit_request("next-2"));
  const std::string got_a = assignment_of(*a).job_id();
  const std::string got_b = assignment_of(*b).job_id();
  EXPECT_TRUE((got_a == next1 && got_b == next2) || (got_a == next2 && got_b == next1))
      << got_a << " " << got_b;
}

TEST_F(CoordinatorGangTest, RanksMeetThroughTheRendezvousOfTheirAttemptOnly) {
  auto a = worker("w-a");
  auto b = worker("w-b");
  const std::string id = submit_ok(gang_request("meets", 2));
  assignment_of(*a);
  assignment_of(*b);
  // Connected only now: an idle outsider present at submission could be given a rank itself.
  auto outsider = worker("w-c");
  const auto channel = coordinator_->channel();

  // Get answers at once: not ready until every key is set.
  v1::RendezvousGetResponse got;
  ASSERT_TRUE(rendezvous_get(channel, "w-a", id, 1, {"rank0", "rank1"}, &got).ok());
  EXPECT_FALSE(got.ready());
  EXPECT_THAT(got.values(), IsEmpty());
  ASSERT_TRUE(rendezvous_set(channel, "w-a", id, 1, "rank0", "addr-a").ok());
  ASSERT_TRUE(rendezvous_get(channel, "w-b", id, 1, {"rank0", "rank1"}, &got).ok());
  EXPECT_FALSE(got.ready());
  ASSERT_TRUE(rendezvous_set(channel, "w-b", id, 1, "rank1", "addr-b").ok());
  ASSERT_TRUE(rendezvous_get(channel, "w-b", id, 1, {"rank0", "rank1"}, &got).ok());
  EXPECT_TRUE(got.ready());
  EXPECT_THAT(got.values(), ElementsAre("addr-a", "addr-b"));
  // Setting a key again overwrites it.
  ASSERT_TRUE(rendezvous_set(channel, "w-a", id, 1, "rank0", "addr-a2").ok());
  ASSERT_TRUE(rendezvous_get(channel, "w-a", id, 1, {"rank0"}, &got).ok());
  EXPECT_THAT(got.values(), ElementsAre("addr-a2"));

  // Only the ranks' connected workers, and only for their own attempt.
  grpc::Status status = rendezvous_set(channel, "w-c", id, 1, "rank2", "intruder");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(status.error_message(), HasSubstr("job " + id + " attempt 1"));
  EXPECT_THAT(status.error_message(), HasSubstr("worker w-c"));
  status = rendezvous_get(channel, "w-nobody", id, 1, {"rank0"}, &got);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(status.error_message(), HasSubstr("worker w-nobody is not connected"));
  status = rendezvous_get(channel, "w-a", id, 2, {"rank0"}, &got);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(status.error_message(), HasSubstr("attempt 2"));

  // The limits, each named.
  status = rendezvous_set(channel, "w-a", id, 1, std::string(257, 'k'), "v");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("limit of 256 bytes per key"));
  status = rendezvous_set(channel, "w-a", id, 1, "big", std::string(64 * 1024 + 1, 'v'));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("limit of 65536 bytes per value"));
  ASSERT_TRUE(rendezvous_set(channel, "w-a", id, 1, "exactly", std::string(64 * 1024, 'v')).ok());
  for (int i = 3; i < 4096; ++i) {  // rank0, rank1 and "exactly" are there already
    ASSERT_TRUE(rendezvous_set(channel, "w-a", id, 1, "k" + std::to_string(i), "v").ok()) << i;
  }
  status = rendezvous_set(channel, "w-b", id, 1, "one-too-many", "v");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("4096 rendezvous keys"));
  EXPECT_TRUE(rendezvous_set(channel, "w-b", id, 1, "rank1", "addr-b2").ok())
      << "overwriting needs no new key";

  // The attempt ends: its namespace is gone and its ranks are refused.
  ASSERT_TRUE(a->report(id, 1, v1::JOB_STATE_SUCCEEDED));
  ASSERT_TRUE(b->report(id, 1, v1::JOB_STATE_SUCCEEDED));
  wait_for_state(*jobs_, id, v1::JOB_STATE_SUCCEEDED, seconds(10));
  status = rendezvous_get(channel, "w-a", id, 1, {"rank0"}, &got);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("job " + id + " attempt 1 is closed"));
  status = rendezvous_set(channel, "w-b", id, 1, "rank1", "late");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

}  // namespace
}  // namespace lomo::server::testing
