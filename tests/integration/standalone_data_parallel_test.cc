// `lomo-worker train JOB.yaml --nproc N`: N local processes train one job data-parallel (Gloo over
// loopback, a FileStore rendezvous) and must follow the single-process run of the same global
// batch. Real processes, the tiny model, a few steps.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "common/checkpoint_layout.h"
#include "tests/integration/test_support.h"
#include "worker/engine/checkpoint_io.h"

namespace lomo::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;
using ::testing::HasSubstr;

const fs::path kWorker = LOMO_WORKER_BIN;
const fs::path kSourceDir = LOMO_SOURCE_DIR;
const std::vector<std::string> kEnv{"OMP_NUM_THREADS=1"};
constexpr int kSteps = 6;

// fp32 tolerances. With two ranks the gradient is the sum of two half-batch gradients instead of
// one sum over the whole batch, and the loss a sum of two partial sums: the same values added in
// another order, which moves each by a few fp32 ulps (relative ~1e-7). Over 6 AdaLomo steps the
// weights then differ by a few ulps of their own size (norm weights near 1 by 1-2 ulps, 1.2e-7 to
// 2.4e-7, as observed). A wrong batch split (other rows, double-counted tokens, a missing gradient
// reduction) changes losses by >1e-3 relative and moves weights by a sizeable part of a step
// (lr x RMS(w) ~ 1e-4 relative), far beyond these bounds.
constexpr double kLossTolerance = 1e-6;  // relative, per step and for the final eval loss
// Per element: |a - b| <= kWeightTolerance * max(|a|, kWeightFloor), i.e. ~8 ulps of the element,
// with elements near zero measured against the initialisation scale (0.02) instead.
constexpr float kWeightTolerance = 1e-6f;
constexpr float kWeightFloor = 0.02f;

class StandaloneDataParallelTest : public ::testing::Test {
 protected:
  // Writes the tiny job with `world_size` ranks into output `name`; returns the job file.
  fs::path job(const std::string& name, int world_size) {
    fs::path file = dir_.path() / (name + ".yaml");
    std::ofstream(file) << tiny_job_yaml(kSourceDir, tiny_model(kWorker), kSteps, 3,
                                         {"output.dir=" + output(name).string(),
                                          "resources.world_size=" + std::to_string(world_size)});
    return file;
  }
  fs::path output(const std::string& name) const { return dir_.path() / name; }

  // Runs lomo-worker train with `extra` flags; expects success.
  void train(const fs::path& job_file, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> argv{kWorker.string(), "train", job_file.string()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    std::string log;
    const ExitStatus status = run_program(argv, &log, seconds(60), kEnv);
    ASSERT_TRUE(status.success()) << status.describe() << "\n" << log;
  }

  ScratchDir dir_{"lomo-nproc-test"};
};

// Step -> loss, and the eval loss, from metrics.jsonl; fails the test on a repeated step.
struct Metrics {
  std::map<int64_t, double> loss;
  std::vector<double> eval_loss;
};

Metrics read_metrics(const fs::path& output_dir) {
  Metrics metrics;
  std::ifstream in(output_dir / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json j = nlohmann::json::parse(line);
    if (j.contains("eval_loss")) {
      metrics.eval_loss.push_back(j["eval_loss"].get<double>());
      continue;
    }
    const auto step = j["step"].get<int64_t>();
    EXPECT_FALSE(metrics.loss.contains(step)) << "step " << step << " logged twice: " << line;
    metrics.loss[step] = j["loss"].get<double>();
  }
  return metrics;
}

void expect_same_losses(const Metrics& one, const Metrics& two) {
  ASSERT_EQ(one.loss.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(two.loss.size(), static_cast<size_t>(kSteps));
  for (const auto& [step, loss] : one.loss) {
    EXPECT_NEAR(two.loss.at(step), loss, kLossTolerance * loss) << "step " << step;
  }
  ASSERT_EQ(one.eval_loss.size(), 1u);
  ASSERT_EQ(two.eval_loss.size(), 1u);
  EXPECT_NEAR(two.eval_loss[0], one.eval_loss[0], kLossTolerance * one.eval_loss[0]);
}

void expect_same_final_weights(const fs::path& one, const fs::path& two) {
  MemoryAccountant accountant;
  const fs::path last = fs::path("checkpoints") / "step-00000006";
  const LlamaWeights a = load_llama_checkpoint(one / last, DType::kF32, accountant);
  const LlamaWeights b = load_llama_checkpoint(two / last, DType::kF32, accountant);
  ASSERT_EQ(a.parameters().size(), b.parameters().size());
  for (size_t p = 0; p < a.parameters().size(); ++p) {
    const Parameter& pa = a.parameters()[p];
    const Parameter& pb = b.parameters()[p];
    ASSERT_EQ(pa.numel(), pb.numel()) << pa.name;
    float worst = 0.0f;  // the largest |a - b| / max(|a|, floor)
    for (int64_t i = 0; i < pa.numel(); ++i) {
      const float x = pa.storage.as<float>()[i];
      const float y = pb.storage.as<float>()[i];
      worst = std::max(worst, std::abs(x - y) / std::max(std::abs(x), kWeightFloor));
    }
    EXPECT_LE(worst, kWeightTolerance) << pa.name;
  }
}

// What the output directory holds: one set of files, written by rank 0.
std::set<std::string> entries(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    names.insert(fs::relative(entry.path(), dir).string());
  }
  return names;
}

TEST_F(StandaloneDataParallelTest, TwoRanksFollowTheSingleProcessRunAndWriteOneOutput) {
  train(job("one", 1));
  train(job("two", 2), {"--nproc", "2"});
  expect_same_losses(read_metrics(output("one")), read_metrics(output("two")));
  expect_same_final_weights(output("one"), output("two"));
  EXPECT_EQ(entries(output("one")), entries(output("two")));
}

TEST_F(StandaloneDataParallelTest, TheSpecsWorldSizeIsTheDefaultAndAResumeContinuesOnEveryRank) {
  train(job("one", 1));
  const fs::path two = job("two", 2);
  train(two);  // no --nproc: resources.world_size 2 starts two ranks
  // Back to the step-3 checkpoint: every rank resumes from it and must reach the same end.
  fs::remove_all(output("two") / "checkpoints" / "step-00000006");
  write_latest_checkpoint(output("two") / "checkpoints", 3);
  std::vector<std::string> argv{kWorker.string(), "train", two.string()};
  std::string log;
  const ExitStatus status = run_program(argv, &log, seconds(60), kEnv);
  ASSERT_TRUE(status.success()) << status.describe() << "\n" << log;
  EXPECT_THAT(log, HasSubstr("step-00000003 at step 3"));
  expect_same_losses(read_metrics(output("one")), read_metrics(output("two")));
  expect_same_final_weights(output("one"), output("two"));
}

TEST_F(StandaloneDataParallelTest, NprocMustMatchTheSpecsWorldSize) {
  std::string log;
  const ExitStatus status = run_program(
      {kWorker.string(), "train", job("one", 1).string(), "--nproc", "2"}, &log, seconds(30), kEnv);
  EXPECT_FALSE(status.signaled);
  EXPECT_EQ(status.code, 2) << log;  // usage
  EXPECT_THAT(log, HasSubstr("--nproc 2 differs from the spec's resources.world_size 1"));
  EXPECT_FALSE(fs::exists(output("one")));
}

}  // namespace
}  // namespace lomo::testing
