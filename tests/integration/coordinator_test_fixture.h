// A test with its own lomo-coordinator process (a fresh data directory each), whose log is
// printed when the test failed: the fixture the coordinator's integration tests share.
#pragma once

#include <gtest/gtest.h>

#include <iostream>
#include <memory>

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

  const double heartbeat_timeout_seconds_;
  TempDir dir_;
  std::unique_ptr<CoordinatorProcess> coordinator_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
};

}  // namespace lomo::server::testing
