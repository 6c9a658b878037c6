// The scheduler: priority (higher first), then submission order; device kinds never mix; the
// worker idle longest gets the next job. Gangs: all-or-nothing on the longest-idle workers, strict
// order per kind (no backfill), and a wait reason for every queued job.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <climits>

#include "server/scheduler.h"

namespace lomo::server {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

constexpr v1::DeviceKind kCpu = v1::DEVICE_KIND_CPU;
constexpr v1::DeviceKind kCuda = v1::DEVICE_KIND_CUDA;

TEST(CoordinatorScheduler, HigherPriorityFirstThenEarlierSubmission) {
  Scheduler scheduler;
  scheduler.add_job("low", 1, 1, kCpu);
  scheduler.add_job("high-late", 5, 4, kCpu);
  scheduler.add_job("mid", 3, 2, kCpu);
  scheduler.add_job("high-early", 5, 3, kCpu);
  scheduler.add_job("negative", -2, 0, kCpu);
  EXPECT_THAT(scheduler.queue_order(kCpu),
              ElementsAre("high-early", "high-late", "mid", "low", "negative"));
  EXPECT_FALSE(scheduler.next().has_value()) << "no worker yet";
  scheduler.add_idle_worker("w", kCpu);
  const auto placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  EXPECT_EQ(placement->job_id, "high-early");
  EXPECT_EQ(placement->worker_id, "w");
  EXPECT_FALSE(scheduler.next().has_value()) << "the worker is busy now";
  EXPECT_EQ(scheduler.queued_jobs(), 4u);
}

TEST(CoordinatorScheduler, ExtremePrioritiesKeepTheirOrder) {
  Scheduler scheduler;
  scheduler.add_job("min", INT64_MIN, 1, kCpu);
  scheduler.add_job("max", INT64_MAX, 2, kCpu);
  scheduler.add_job("zero", 0, 3, kCpu);
  EXPECT_THAT(scheduler.queue_order(kCpu), ElementsAre("max", "zero", "min"));
}

TEST(CoordinatorScheduler, JobsOnlyGoToWorkersOfTheirDeviceKind) {
  Scheduler scheduler;
  scheduler.add_job("gpu-job", 10, 1, kCuda);
  scheduler.add_job("cpu-job", 0, 2, kCpu);
  scheduler.add_idle_worker("cpu-worker", kCpu);
  auto placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  EXPECT_EQ(placement->job_id, "cpu-job") << "the cuda job outranks it but cannot run here";
  EXPECT_FALSE(scheduler.next().has_value());
  scheduler.add_idle_worker("gpu-worker", kCuda);
  placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  EXPECT_EQ(placement->job_id, "gpu-job");
  EXPECT_EQ(placement->worker_id, "gpu-worker");
}

TEST(CoordinatorScheduler, LongestIdleWorkerFirst) {
  Scheduler scheduler;
  scheduler.add_idle_worker("first", kCpu);
  scheduler.add_idle_worker("second", kCpu);
  scheduler.add_idle_worker("first", kCpu);  // already idle: keeps its place
  scheduler.add_job("a", 0, 1, kCpu);
  scheduler.add_job("b", 0, 2, kCpu);
  EXPECT_EQ(scheduler.next()->worker_id, "first");
  EXPECT_EQ(scheduler.next()->worker_id, "second");
}

// A worker becomes idle at its first heartbeat but ranks by when it registered (its ticket), so
// rank 0 of a gang is the worker that registered first, whichever heartbeat came first.
TEST(CoordinatorScheduler, AWorkerIdleByTicketRanksFromWhenItTookIt) {
  Scheduler scheduler;
  const uint64_t early = scheduler.idle_ticket();
  scheduler.add_busy_worker("registered-first", kCpu);
  scheduler.add_idle_worker("idle-since", kCpu);
  scheduler.add_idle_worker("registered-first", kCpu, early);
  scheduler.add_job("gang", 0, 1, kCpu, 2);
  const std::optional<Placement> placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  EXPECT_THAT(placement->workers, ElementsAre("registered-first", "idle-since"));
}

TEST(CoordinatorScheduler, RemovedJobsAndWorkersAreNotPlaced) {
  Scheduler scheduler;
  scheduler.add_job("cancelled", 9, 1, kCpu);
  scheduler.add_job("kept", 1, 2, kCpu);
  scheduler.add_idle_worker("gone", kCpu);
  scheduler.add_idle_worker("here", kCpu);
  scheduler.remove_job("cancelled");
  scheduler.remove_worker("gone");
  scheduler.remove_job("never-added");
  const auto placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  EXPECT_EQ(placement->job_id, "kept");
  EXPECT_EQ(placement->worker_id, "here");
  EXPECT_EQ(scheduler.idle_workers(), 0u);
}

TEST(CoordinatorScheduler, RequeuedJobKeepsItsSubmissionPlace) {
  Scheduler scheduler;
  scheduler.add_job("old", 0, 1, kCpu);
  scheduler.add_job("new", 0, 2, kCpu);
  scheduler.add_job("old", 0, 1, kCpu);  // added again (e.g. a retry): no duplicate
  EXPECT_THAT(scheduler.queue_order(kCpu), ElementsAre("old", "new"));
}

TEST(CoordinatorScheduler, AWorkerChangingDeviceKindMovesQueues) {
  Scheduler scheduler;
  scheduler.add_idle_worker("w", kCpu);
  scheduler.add_idle_worker("w", kCuda);
  scheduler.add_job("cpu-job", 0, 1, kCpu);
  EXPECT_FALSE(scheduler.next().has_value());
  scheduler.add_job("gpu-job", 0, 2, kCuda);
  EXPECT_EQ(scheduler.next()->job_id, "gpu-job");
}

TEST(CoordinatorScheduler, AGangIsPlacedAllOrNothingOnTheLongestIdleWorkers) {
  Scheduler scheduler;
  scheduler.add_idle_worker("idle-first", kCpu);
  scheduler.add_job("gang", 0, 1, kCpu, 3);
  scheduler.add_idle_worker("idle-second", kCpu);
  EXPECT_FALSE(scheduler.next().has_value()) << "2 of 3 workers: nothing is taken";
  EXPECT_EQ(scheduler.idle_workers(), 2u);
  EXPECT_EQ(scheduler.wait_reason("gang"),
            "needs 3 cpu workers, 2 connected: waiting for more to connect (jobs behind it are "
            "served meanwhile)");
  scheduler.add_idle_worker("idle-third", kCpu);
  const auto placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  EXPECT_EQ(placement->job_id, "gang");
  EXPECT_THAT(placement->workers, ElementsAre("idle-first", "idle-second", "idle-third"))
      << "rank r is the r-th longest idle";
  EXPECT_EQ(placement->worker_id, "idle-first");
  EXPECT_EQ(scheduler.idle_workers(), 0u);
  EXPECT_EQ(scheduler.queued_jobs(), 0u);
  EXPECT_EQ(scheduler.wait_reason("gang"), "") << "placed: no longer waiting";
}

TEST(CoordinatorScheduler, ASmallerJobBehindAWaitingGangWaitsToo) {
  Scheduler scheduler;
  scheduler.add_idle_worker("busy", kCpu);
  scheduler.add_job("running", 9, 1, kCpu);
  ASSERT_EQ(scheduler.next()->job_id, "running");  // "busy" is busy from here on
  scheduler.add_idle_worker("a", kCpu);
  scheduler.add_idle_worker("b", kCpu);
  scheduler.add_job("gang", 5, 2, kCpu, 3);
  scheduler.add_job("small", 0, 3, kCpu, 1);
  EXPECT_FALSE(scheduler.next().has_value())
      << "two idle workers would fit the small job, but the gang is first (no backfill)";
  EXPECT_EQ(scheduler.wait_reason("gang"), "waiting for 3 idle cpu workers, 2 idle");
  EXPECT_EQ(scheduler.wait_reason("small"),
            "waiting behind job gang (priority 5), which needs 3 idle cpu workers, 2 idle");
  // A stream of small jobs does not starve the gang: once "busy" is free, the gang goes first.
  scheduler.add_job("small-2", 0, 4, kCpu, 1);
  scheduler.add_idle_worker("busy", kCpu);
  const auto placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  EXPECT_EQ(placement->job_id, "gang");
  EXPECT_THAT(placement->workers, ElementsAre("a", "b", "busy"));
  EXPECT_EQ(scheduler.wait_reason("small"), "waiting for 1 idle cpu worker, 0 idle");
  EXPECT_EQ(scheduler.wait_reason("small-2"),
            "waiting behind job small (priority 0), which needs 1 idle cpu worker, 0 idle");
}

TEST(CoordinatorScheduler, AJobLargerThanTheConnectedWorkersDoesNotHoldTheQueue) {
  Scheduler scheduler;
  scheduler.add_idle_worker("a", kCpu);
  scheduler.add_idle_worker("b", kCpu);
  scheduler.add_job("too-big", 9, 1, kCpu, 4);
  scheduler.add_job("small", 0, 2, kCpu, 1);
  const auto placement = scheduler.next();
  ASSERT_TRUE(placement.has_value()) << "4 workers can never be idle with 2 connected";
  EXPECT_EQ(placement->job_id, "small");
  EXPECT_EQ(scheduler.wait_reason("too-big"),
            "needs 4 cpu workers, 2 connected: waiting for more to connect (jobs behind it are "
            "served meanwhile)");
  // Enough workers connect: the big job holds the queue again, and the next small job waits.
  scheduler.add_busy_worker("c", kCpu);
  scheduler.add_idle_worker("d", kCpu);
  scheduler.add_job("small-2", 0, 3, kCpu, 1);
  EXPECT_FALSE(scheduler.next().has_value());
  EXPECT_EQ(scheduler.wait_reason("too-big"), "waiting for 4 idle cpu workers, 2 idle");
  EXPECT_EQ(scheduler.wait_reason("small-2"),
            "waiting behind job too-big (priority 9), which needs 4 idle cpu workers, 2 idle");
  // A worker that goes away counts no more.
  scheduler.remove_worker("c");
  EXPECT_EQ(scheduler.next()->job_id, "small-2");
}

TEST(CoordinatorScheduler, TwoGangsOfTwoOnThreeWorkersNeverDeadlockAndFinishInOrder) {
  // Without all-or-nothing placement, each gang could take one or two workers and both would
  // wait forever for the rest. Here the first gang takes two, the second takes none until the
  // first ends, and both run, in submission order.
  Scheduler scheduler;
  for (const char* worker : {"w1", "w2", "w3"}) scheduler.add_idle_worker(worker, kCpu);
  scheduler.add_job("first", 0, 1, kCpu, 2);
  scheduler.add_job("second", 0, 2, kCpu, 2);
  std::vector<std::string> started;
  auto placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  started.push_back(placement->job_id);
  EXPECT_THAT(placement->workers, ElementsAre("w1", "w2"));
  EXPECT_FALSE(scheduler.next().has_value());
  EXPECT_EQ(scheduler.idle_workers(), 1u) << "the waiting gang holds no worker";
  EXPECT_EQ(scheduler.wait_reason("second"), "waiting for 2 idle cpu workers, 1 idle");
  // The first gang ends: its workers are idle again, after w3.
  for (const std::string& worker : placement->workers) scheduler.add_idle_worker(worker, kCpu);
  placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  started.push_back(placement->job_id);
  EXPECT_THAT(placement->workers, ElementsAre("w3", "w1"));
  EXPECT_THAT(started, ElementsAre("first", "second"));
  EXPECT_EQ(scheduler.queued_jobs(), 0u);
}

TEST(CoordinatorScheduler, DeviceKindsAreServedIndependently) {
  Scheduler scheduler;
  scheduler.add_idle_worker("gpu", kCuda);
  scheduler.add_idle_worker("cpu", kCpu);
  scheduler.add_job("gpu-gang", 9, 1, kCuda, 2);
  scheduler.add_busy_worker("gpu-2", kCuda);
  scheduler.add_job("cpu-job", 0, 2, kCpu, 1);
  const auto placement = scheduler.next();
  ASSERT_TRUE(placement.has_value());
  EXPECT_EQ(placement->job_id, "cpu-job") << "a waiting cuda gang does not hold cpu workers";
  EXPECT_EQ(scheduler.wait_reason("gpu-gang"), "waiting for 2 idle cuda workers, 1 idle");
}

TEST(CoordinatorScheduler, PublishedHeadsGiveTheSameReasonsWithoutTheScheduler) {
  Scheduler scheduler;
  const auto empty = scheduler.published();
  scheduler.add_idle_worker("a", kCpu);
  scheduler.add_busy_worker("b", kCpu);
  scheduler.add_job("head", 3, 1, kCpu, 2);
  scheduler.add_job("behind", 1, 2, kCpu, 1);
  scheduler.add_job("huge", 7, 3, kCpu, 3);
  const auto heads = scheduler.published();
  for (const std::string job : {"head", "behind", "huge"}) {
    const int64_t world_size = job == "head" ? 2 : job == "behind" ? 1 : 3;
    EXPECT_EQ(wait_reason(*heads, job, kCpu, world_size), scheduler.wait_reason(job)) << job;
  }
  EXPECT_THAT(*empty, IsEmpty()) << "an earlier copy does not change";
  EXPECT_EQ(heads->at(kCpu).job_id, "head");
  EXPECT_EQ(heads->at(kCpu).idle, 1);
  EXPECT_EQ(heads->at(kCpu).connected, 2);
  EXPECT_EQ(wait_reason(*heads, "gpu", kCuda, 1),
            "needs 1 cuda worker, 0 connected: waiting for more to connect (jobs behind it are "
            "served meanwhile)");
}

}  // namespace
}  // namespace lomo::server
