// A test with its own lomo-coordinator process (a fresh data directory each), whose log is
// printed when the test failed: the fixture the coordinator's integration tests share.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <iostream>
#include <memory>
#include <string>

#include "tests/integration/coordinator_harness.h"

namespace lomo::server::testing {

class CoordinatorTest : public ::testing::Test {
 protected:
  explicit CoordinatorTest(double heartbeat_timeout_seconds)
      : heartbeat_timeout_seconds_(heartbeat_timeout_seconds) {}

  void SetUp() override {
    coordinator_ = std::make_unique<CoordinatorProcess>(
        ProcessOptions(dir_.path() / "data", heartbeat_timeout_seconds_));
    jobs_ = coordinator_->jobs();
  }
  void TearDown() override {
    if (HasFailure() && coordinator_) std::cerr << "coordinator log:\n" << coordinator_->log();
  }

  // SubmitJob that must succeed: the new job, or its id.
  v1::Job submit_job_ok(const v1::SubmitJobRequest& request) {
    v1::Job job;
    const grpc::Status status = submit(*jobs_, request, &job);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return job;
  }
  std::string submit_ok(const v1::SubmitJobRequest& request) { return submit_job_ok(request).id(); }

  // A test worker registered as `id`, heartbeating every 200 ms.
  std::unique_ptr<TestWorker> worker(const std::string& id) {
    auto w = std::make_unique<TestWorker>(coordinator_->channel());
    w->register_as(id);
    w->start_heartbeats(std::chrono::milliseconds(200));
    return w;
  }

  // The assignment `w` receives (within the longest restart backoff a test uses); it heartbeats
  // it from then on, as a daemon would.
  v1::Assignment assignment_of(TestWorker& w) {
    const auto assignment = w.next_assignment(std::chrono::seconds(20));
    EXPECT_TRUE(assignment.has_value()) << "no assignment";
    if (!assignment) return {};
    w.set_current(assignment->job_id(), assignment->attempt());
    return *assignment;
  }

  v1::Job job_now(const std::string& job_id) {
    v1::Job job;
    EXPECT_TRUE(get(*jobs_, job_id, &job).ok());
    return job;
  }

  // Every log line and state-change reason of the job, one per line.
  std::string history(const std::string& job_id) { return event_texts(job_id, true, true); }
  // Only the state-change reasons, one per line.
  std::string state_changes(const std::string& job_id) { return event_texts(job_id, false, true); }

  const double heartbeat_timeout_seconds_;
  TempDir dir_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<v1::JobService::Stub> jobs_;

 private:
  std::string event_texts(const std::string& job_id, bool logs, bool state_changes) {
    std::string text;
    for (const v1::JobEvent& event : all_events(*jobs_, job_id)) {
      if (logs && event.has_log()) text += event.log().text() + "\n";
      if (state_changes && event.has_state_change()) {
        text += event.state_change().reason() + "\n";
      }
    }
    return text;
  }
};

// `request` with resources.max_restarts set.
inline v1::SubmitJobRequest with_restarts(v1::SubmitJobRequest request, int max_restarts) {
  auto& fields = *request.mutable_spec()->mutable_fields();
  (*fields["resources"].mutable_struct_value()->mutable_fields())["max_restarts"].set_number_value(
      max_restarts);
  return request;
}

}  // namespace lomo::server::testing
