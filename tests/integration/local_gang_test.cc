// `lomoctl local JOB.yaml --workers 2`: a coordinator and two CPU workers as real processes on
// loopback run one job as a gang of two ranks (rendezvous through the coordinator, Gloo between
// the ranks). Its downloaded checkpoint must load in the engine and hold exactly the weights of
// the coordinator-free launcher's run of the same spec, `lomo-worker train JOB.yaml --nproc 2`.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <fstream>

#include "common/checkpoint_layout.h"
#include "tests/integration/test_support.h"
#include "worker/engine/checkpoint_io.h"

namespace lomo::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;
using ::testing::HasSubstr;

const fs::path kWorker = LOMO_WORKER_BIN;
const fs::path kLomoctl = LOMO_LOMOCTL_BIN;
const fs::path kSourceDir = LOMO_SOURCE_DIR;
constexpr int kSteps = 6;
// One OpenMP thread per rank in both runs: the kernels are deterministic for a given thread
// count, so equal thread counts are what makes a bit-for-bit comparison fair. lomoctl local passes
// a user's OMP_NUM_THREADS on unchanged; the --nproc launcher gives each rank max(1, 1 / 2) = 1.
const std::vector<std::string> kEnv{"OMP_NUM_THREADS=1"};

// The regular files under `dir`, as paths relative to it.
std::vector<fs::path> files_under(const fs::path& dir) {
  std::vector<fs::path> files;
  if (!fs::exists(dir)) return files;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) files.push_back(fs::relative(entry.path(), dir));
  }
  return files;
}

// The index of the first element whose bits differ (-0.0 vs 0.0 and NaN payloads included), or -1.
int64_t first_bitwise_difference(const float* x, const float* y, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    if (std::bit_cast<uint32_t>(x[i]) != std::bit_cast<uint32_t>(y[i])) return i;
  }
  return -1;
}

// Every parameter of the two checkpoints, compared bit for bit.
void expect_identical_weights(const fs::path& expected_dir, const fs::path& actual_dir) {
  MemoryAccountant accountant;
  const LlamaWeights expected = load_llama_checkpoint(expected_dir, DType::kF32, accountant);
  const LlamaWeights actual = load_llama_checkpoint(actual_dir, DType::kF32, accountant);
  ASSERT_EQ(expected.parameters().size(), actual.parameters().size());
  for (size_t p = 0; p < expected.parameters().size(); ++p) {
    const Parameter& e = expected.parameters()[p];
    const Parameter& a = actual.parameters()[p];
    ASSERT_EQ(e.name, a.name);
    ASSERT_EQ(e.numel(), a.numel()) << e.name;
    const float* x = e.storage.as<float>();
    const float* y = a.storage.as<float>();
    const int64_t first = first_bitwise_difference(x, y, e.numel());
    EXPECT_EQ(first, -1) << e.name << " differs first at element " << first << ": "
                         << (first >= 0 ? x[first] : 0.0f) << " (standalone) vs "
                         << (first >= 0 ? y[first] : 0.0f) << " (lomoctl local)";
  }
}

class LocalGangTest : public ::testing::Test {
 protected:
  const fs::path& dir() const { return scratch_.path(); }
  ScratchDir scratch_{"lomo-local-gang-test"};
};

// The claim: a gang scheduled by the coordinator computes what the standalone launcher computes.
// Both run the same trainer on the same spec with 2 ranks of 1 thread; each rank takes the same
// shard; the Gloo communicator's ring reduction gives identical bits on every rank in an order
// fixed by the rank numbers alone. Only how the ranks meet differs (the coordinator's key-value
// rendezvous vs a FileStore directory), and that decides no arithmetic. So no tolerance: any
// difference in the final weights is a difference in what was computed.
TEST_F(LocalGangTest, TwoWorkersTrainTheStandaloneLaunchersWeightsBitForBit) {
  const fs::path model = tiny_model(kWorker);
  const fs::path job = dir() / "job.yaml";
  // The tiny example with a checkpoint at step 3 and at the end; the spec says world_size 1, so
  // --workers 2 sets it to 2 (and the launcher is given the same override).
  std::ofstream(job) << tiny_job_yaml(kSourceDir, model, kSteps, 3);
  const fs::path state = dir() / "local-state";
  const fs::path out = dir() / "local-out";

  std::string output;
  const ExitStatus local = run_program({kLomoctl.string(), "local", job.string(), "--workers", "2",
                                        "--state-dir", state.string(), "--out", out.string()},
                                       &output, seconds(170), kEnv);
  ASSERT_TRUE(local.success()) << local.describe() << "\n" << output;
  EXPECT_THAT(output, HasSubstr("2 CPU workers (local-cpu-0 .. local-cpu-1)"));
  EXPECT_THAT(output, HasSubstr("SUCCEEDED"));
  EXPECT_THAT(output, HasSubstr("step-00000006"));
  // The checkpoint loads in the engine, with its training state beside it.
  {
    MemoryAccountant accountant;
    EXPECT_NO_THROW(load_llama_checkpoint(out, DType::kF32, accountant)) << output;
  }
  EXPECT_TRUE(fs::exists(out / "lomo_trainer_state.json"));
  // Each worker had its own directory and log, and both were stopped at the end.
  for (const std::string i : {"0", "1"}) {
    EXPECT_TRUE(fs::is_directory(state / ("worker-" + i)));
    EXPECT_THAT(read_file(state / ("worker-" + i + ".log")), HasSubstr("stopped")) << i;
  }
  // Exactly one worker (rank 0's) wrote checkpoints; the other worker's directory holds none.
  int with_checkpoints = 0;
  for (const std::string i : {"0", "1"}) {
    for (const fs::path& file : files_under(state / ("worker-" + i))) {
      if (file.string().find("/checkpoints/step-") != std::string::npos) {
        ++with_checkpoints;
        break;
      }
    }
  }
  EXPECT_EQ(with_checkpoints, 1);

  const fs::path standalone = dir() / "standalone";
  const ExitStatus launcher =
      run_program({kWorker.string(), "train", job.string(), "--nproc", "2", "--set",
                   "resources.world_size=2", "--set", "output.dir=" + standalone.string()},
                  &output, seconds(120), kEnv);
  ASSERT_TRUE(launcher.success()) << launcher.describe() << "\n" << output;
  expect_identical_weights(checkpoint_directory(checkpoints_directory(standalone), kSteps), out);
}

TEST_F(LocalGangTest, AWorkerCountThatDisagreesWithTheSpecFailsBeforeAnythingStarts) {
  const fs::path job = dir() / "job.yaml";
  std::ofstream(job) << tiny_job_yaml(kSourceDir, dir() / "no-model", kSteps, 0,
                                      {"resources.world_size=2"});
  const fs::path state = dir() / "state";
  std::string output;
  ExitStatus status = run_program(
      {kLomoctl.string(), "local", job.string(), "--workers", "3", "--state-dir", state.string()},
      &output, seconds(30), kEnv);
  EXPECT_EQ(status.code, 3) << output;
  EXPECT_THAT(output, HasSubstr("--workers 3 differs from the spec's resources.world_size 2"));
  status = run_program(
      {kLomoctl.string(), "local", job.string(), "--workers", "0", "--state-dir", state.string()},
      &output, seconds(30), kEnv);
  EXPECT_EQ(status.code, 3) << output;
  EXPECT_THAT(output, HasSubstr("--workers 0: expected 1 to 64"));
  // tiny-adalomo's global batch of 4 rows cannot be split over 3 ranks: the spec's own check.
  const fs::path single = dir() / "single.yaml";
  std::ofstream(single) << tiny_job_yaml(kSourceDir, dir() / "no-model", kSteps, 0);
  status = run_program({kLomoctl.string(), "local", single.string(), "--workers", "3",
                        "--state-dir", state.string()},
                       &output, seconds(30), kEnv);
  EXPECT_EQ(status.code, 3) << output;
  EXPECT_THAT(output, HasSubstr("must be divisible by resources.world_size (3)"));
  EXPECT_FALSE(fs::exists(state)) << "a process was started";
}

// A worker that cannot run (here a program that exits at once in place of lomo-worker) leaves
// the gang short for good: local mode has no other worker. It says so and cancels the queued job
// instead of waiting forever.
TEST_F(LocalGangTest, AWorkerThatEndsBeforeItsGangFormsCancelsTheJobInsteadOfWaitingForever) {
  const fs::path job = dir() / "job.yaml";
  std::ofstream(job) << tiny_job_yaml(kSourceDir, dir() / "no-model", kSteps, 0);
  std::string output;
  const ExitStatus status =
      run_program({kLomoctl.string(), "local", job.string(), "--workers", "2", "--state-dir",
                   (dir() / "state").string(), "--worker-bin", "/bin/false"},
                  &output, seconds(60), kEnv);
  EXPECT_FALSE(status.signaled) << output;
  EXPECT_EQ(status.code, 2) << output;  // CANCELLED
  EXPECT_THAT(output, HasSubstr("lomo-worker local-cpu-"));
  EXPECT_THAT(output, HasSubstr("exited with code 1 during the job"));
  EXPECT_THAT(output, HasSubstr("which can no longer get its workers"));
}

}  // namespace
}  // namespace lomo::testing
