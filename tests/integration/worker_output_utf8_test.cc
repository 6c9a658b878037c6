// Trainer output that is not UTF-8 (issue 12): it reaches the coordinator as the failure reason,
// with U+FFFD for each bad byte, on a worker stream that stays up, instead of breaking the stream
// (protobuf strings must be UTF-8) and losing the reason.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <string>

#include "tests/integration/fake_coordinator.h"
#include "tests/integration/test_support.h"

namespace lomo::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;
using ::testing::HasSubstr;

const fs::path kWorker = LOMO_WORKER_BIN;
const fs::path kSourceDir = LOMO_SOURCE_DIR;

// A copy of the tiny model whose config.json has a key with the bytes FF FE: the trainer's JSON
// error quotes them raw on stderr.
fs::path model_with_bad_bytes(const fs::path& tiny, const fs::path& dir) {
  fs::copy(tiny, dir, fs::copy_options::recursive);
  const fs::path config = dir / "config.json";
  std::ifstream in(config, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  text.replace(text.find('{'), 1, "{\"bad\xff\xfe\": 1, ");
  std::ofstream(config, std::ios::binary | std::ios::trunc) << text;
  return dir;
}

TEST(WorkerOutputUtf8Test, BadBytesOnStderrBecomeReplacementCharactersInTheReason) {
  ScratchDir scratch("lomo-worker-utf8-test");
  const fs::path tiny = tiny_model(kWorker);
  const fs::path bad = model_with_bad_bytes(tiny, scratch.path() / "bad-model");
  FakeCoordinator coordinator;
  const fs::path log = scratch.path() / "worker.log";
  auto worker = start_program(
      {kWorker.string(), "serve", "--coordinator", coordinator.address(), "--device", "cpu",
       "--work-dir", (scratch.path() / "work").string(), "--worker-id", "utf8-worker"},
      log, {"OMP_NUM_THREADS=1"});
  ASSERT_TRUE(coordinator.wait_registered(1, seconds(20))) << read_file(log);
  ASSERT_TRUE(coordinator.assign(
      "job-bytes", 1, tiny_job_struct(kSourceDir, tiny, 5, 0, {"model.path=" + bad.string()})));
  const auto status = coordinator.wait_terminal("job-bytes", seconds(60));
  ASSERT_TRUE(status) << read_file(log);
  EXPECT_EQ(status->state(), lomo::v1::JOB_STATE_FAILED);
  EXPECT_THAT(status->reason(), HasSubstr("ill-formed UTF-8"));
  EXPECT_THAT(status->reason(), HasSubstr("last read: '\"bad\xef\xbf\xbd'"));
  // Still the same stream: one registration, and the next job runs on it.
  ASSERT_TRUE(coordinator.assign("job-next", 1, tiny_job_struct(kSourceDir, tiny, 3, 0)));
  const auto next = coordinator.wait_terminal("job-next", seconds(60));
  ASSERT_TRUE(next) << read_file(log);
  EXPECT_EQ(next->state(), lomo::v1::JOB_STATE_SUCCEEDED) << next->reason();
  EXPECT_FALSE(coordinator.wait_registered(2, seconds(1)));
  worker->terminate(seconds(20));
}

}  // namespace
}  // namespace lomo::testing
