// The scheduler: priority (higher first), then submission order; device kinds never mix; the
// worker idle longest gets the next job.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <climits>

#include "server/scheduler.h"

namespace lomo::server {
namespace {

using ::testing::ElementsAre;

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

}  // namespace
}  // namespace lomo::server
