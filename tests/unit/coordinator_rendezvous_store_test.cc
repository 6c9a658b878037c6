// The rendezvous key-value store's memory bound: an attempt holds at most 1 MiB of keys and
// values and all attempts together at most 64 MiB, each refusal RESOURCE_EXHAUSTED naming its
// limit; overwriting is charged only for what it adds, and a dropped attempt gives its bytes back.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "server/rendezvous.h"

namespace lomo::server {
namespace {

using ::testing::HasSubstr;

constexpr size_t kValue = Rendezvous::kMaxValueBytes;

// Fills (job, attempt) with 64 KiB values under keys "v0", "v1", ... while they fit the attempt's
// budget; returns how many bytes it holds.
size_t fill(Rendezvous& rendezvous, const std::string& job, int64_t attempt) {
  size_t bytes = 0;
  for (int i = 0;; ++i) {
    const std::string key = "v" + std::to_string(i);
    if (bytes + key.size() + kValue > Rendezvous::kMaxBytesPerAttempt) return bytes;
    EXPECT_TRUE(rendezvous.set(job, attempt, key, std::string(kValue, 'x')).ok()) << key;
    bytes += key.size() + kValue;
  }
}

TEST(CoordinatorRendezvousStore, AnAttemptHoldsAtMostOneMebibyteOfKeysAndValues) {
  Rendezvous rendezvous;
  const size_t held = fill(rendezvous, "job-a", 1);
  EXPECT_EQ(rendezvous.total_bytes(), held);
  const grpc::Status refused = rendezvous.set("job-a", 1, "one-more", std::string(kValue, 'x'));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.error_message(), HasSubstr("job job-a attempt 1"));
  EXPECT_THAT(refused.error_message(), HasSubstr("over the limit of 1048576 bytes per attempt"));
  EXPECT_EQ(rendezvous.total_bytes(), held) << "a refused write holds nothing";

  // Another attempt has a budget of its own.
  EXPECT_TRUE(rendezvous.set("job-a", 2, "rank0", "addr").ok());
}

TEST(CoordinatorRendezvousStore, OverwritingIsChargedOnlyForWhatItAdds) {
  Rendezvous rendezvous;
  const size_t held = fill(rendezvous, "job-a", 1);
  // The same value again (a retried set) and a shorter one always fit.
  ASSERT_TRUE(rendezvous.set("job-a", 1, "v0", std::string(kValue, 'y')).ok());
  ASSERT_TRUE(rendezvous.set("job-a", 1, "v0", "short").ok());
  EXPECT_EQ(rendezvous.total_bytes(), held - kValue + 5);
  // The space the shorter value freed is usable by a new key.
  EXPECT_TRUE(rendezvous.set("job-a", 1, "new", std::string(kValue - 100, 'z')).ok());
  bool ready = false;
  std::vector<std::string> values;
  ASSERT_TRUE(rendezvous.get("job-a", 1, {"v0", "new"}, &ready, &values).ok());
  ASSERT_TRUE(ready);
  EXPECT_EQ(values[0], "short");
  EXPECT_EQ(values[1].size(), kValue - 100);
}

TEST(CoordinatorRendezvousStore, AllAttemptsTogetherHoldAtMost64MebibytesAndDropGivesItBack) {
  Rendezvous rendezvous;
  // Fill whole attempts until the next full one would not fit the total.
  int attempts = 0;
  while (rendezvous.total_bytes() + Rendezvous::kMaxBytesPerAttempt <= Rendezvous::kMaxTotalBytes) {
    fill(rendezvous, "job-" + std::to_string(attempts), 1);
    ++attempts;
  }
  // The remainder of the total is smaller than one attempt's budget: some set in a fresh attempt
  // is refused for the total, not for its own budget.
  grpc::Status refused;
  for (int i = 0; refused.ok(); ++i) {
    refused = rendezvous.set("job-last", 1, "v" + std::to_string(i), std::string(kValue, 'x'));
    ASSERT_LT(i, 16) << "an attempt's own budget ended first";
  }
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.error_message(),
              HasSubstr("over the limit of 67108864 bytes on this coordinator"));
  EXPECT_LE(rendezvous.total_bytes(), Rendezvous::kMaxTotalBytes);

  // A job that ends gives its bytes back.
  const size_t before = rendezvous.total_bytes();
  rendezvous.drop_job("job-0");
  rendezvous.drop("job-1", 1);
  EXPECT_LT(rendezvous.total_bytes(), before - Rendezvous::kMaxBytesPerAttempt);
  EXPECT_TRUE(rendezvous.set("job-last", 1, "after-drop", std::string(kValue, 'x')).ok());
}

}  // namespace
}  // namespace lomo::server
