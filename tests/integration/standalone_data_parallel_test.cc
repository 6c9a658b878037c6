// `lomo-worker train JOB.yaml --nproc N`: N local processes train one job data-parallel (Gloo over
// loopback, a FileStore rendezvous) and must follow the single-process run of the same global
// batch. Real processes, the tiny model, a few steps. Issue 9's central claim through real
// processes: world sizes 1, 2 and 4 follow the same trajectory for LOMO, LOMO + clip_grad_norm,
// AdaLomo and fp16 with loss scaling; the ranks' weights stay bit-identical; and a deliberately
// broken reduction (the LOMO_TEST_FAULT hook of lomo-worker train) is caught.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "common/checkpoint_layout.h"
#include "common/trainer_protocol.h"
#include "tests/integration/test_support.h"
#include "worker/engine/checkpoint_io.h"

namespace lomo::testing {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

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
  // Writes the tiny job (AdaLomo unless `overrides` say otherwise) with `world_size` ranks into
  // output `name`, checkpointing at step 3 and at the end; returns the job file.
  fs::path job(const std::string& name, int world_size,
               const std::vector<std::string>& overrides = {}) {
    fs::path file = dir_.path() / (name + ".yaml");
    std::vector<std::string> all{"output.dir=" + output(name).string(),
                                 "resources.world_size=" + std::to_string(world_size)};
    all.insert(all.end(), overrides.begin(), overrides.end());
    std::ofstream(file) << tiny_job_yaml(kSourceDir, tiny_model(kWorker), kSteps, 3, all);
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

// The last record of a protocol file, which must be the outcome.
trainer_protocol::Outcome last_outcome(const fs::path& protocol_file) {
  std::ifstream in(protocol_file);
  std::string line, last;
  while (std::getline(in, line)) last = line;
  const trainer_protocol::Record record = trainer_protocol::parse_line(last);
  EXPECT_TRUE(std::holds_alternative<trainer_protocol::Outcome>(record)) << last;
  return std::holds_alternative<trainer_protocol::Outcome>(record)
             ? std::get<trainer_protocol::Outcome>(record)
             : trainer_protocol::Outcome{};
}

// A two-rank run long enough for a signal to land mid-training (~15 steps/s per rank unloaded),
// short enough to finish in a few seconds: a checkpoint only at the end, so that any other one
// is the stop's.
constexpr int kLongSteps = 60;

class LaunchFailureTest : public StandaloneDataParallelTest {
 protected:
  void SetUp() override {
    std::ofstream(job_file_) << tiny_job_yaml(
        kSourceDir, tiny_model(kWorker), kLongSteps, kLongSteps,
        {"output.dir=" + output("run").string(), "resources.world_size=2"});
  }
  std::vector<std::string> argv() const {
    std::vector<std::string> args{
        kWorker.string(),       "train", job_file_.string(), "--nproc", "2", "--protocol-file",
        protocol_file_.string()};
    args.insert(args.end(), extra_args_.begin(), extra_args_.end());
    return args;
  }
  // Starts the launcher; returns once rank 0 has logged `steps` training steps (fails the test
  // if it does not within 20 s).
  std::unique_ptr<ChildProcess> start_and_wait_for_steps(int steps) {
    std::unique_ptr<ChildProcess> launcher = start_program(argv(), log_, kEnv);
    const bool reached =
        wait_until([&] { return steps_logged() >= steps || !launcher->running(); }, seconds(20));
    EXPECT_TRUE(reached && launcher->running()) << "no step " << steps << " while running:\n"
                                                << read_file(log_);
    return launcher;
  }
  // Training steps in metrics.jsonl so far (a line being written is not counted).
  int steps_logged() const {
    std::ifstream in(output("run") / "metrics.jsonl");
    int steps = 0;
    for (std::string line; std::getline(in, line);) {
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("loss")) ++steps;
    }
    return steps;
  }
  // The last record of the protocol file, which must be the outcome.
  trainer_protocol::Outcome outcome() const { return last_outcome(protocol_file_); }

  fs::path job_file_ = dir_.path() / "run.yaml";
  fs::path protocol_file_ = dir_.path() / "protocol.jsonl";
  fs::path log_ = dir_.path() / "launcher.log";
  std::vector<std::string> extra_args_;  // appended to argv()
};

// /proc/<pid>/cmdline with its NULs as spaces; "" once the process is gone.
std::string command_line(pid_t pid) {
  std::string text = read_file(fs::path("/proc") / std::to_string(pid) / "cmdline");
  std::replace(text.begin(), text.end(), '\0', ' ');
  return text;
}

// The launcher's children: its rank processes.
std::vector<pid_t> children(pid_t parent) {
  std::vector<pid_t> pids;
  for (const auto& task :
       fs::directory_iterator(fs::path("/proc") / std::to_string(parent) / "task")) {
    std::ifstream in(task.path() / "children");
    for (pid_t pid = 0; in >> pid;) pids.push_back(pid);
  }
  return pids;
}

// The processes (besides zombies' empty command lines) whose command line contains `text`.
std::vector<pid_t> processes_mentioning(const std::string& text) {
  std::vector<pid_t> found;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = std::stoi(name);
    if (pid != ::getpid() && command_line(pid).find(text) != std::string::npos)
      found.push_back(pid);
  }
  return found;
}

// Step -> figures, and the eval loss, from metrics.jsonl; fails the test on a repeated step.
struct Metrics {
  std::map<int64_t, double> loss;
  std::map<int64_t, double> grad_norm;
  std::map<int64_t, double> loss_scale;
  std::map<int64_t, bool> skipped;
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
    // A skipped step's norm is not finite, which JSON writes as null.
    metrics.grad_norm[step] = j["grad_norm"].is_null() ? std::numeric_limits<double>::quiet_NaN()
                                                       : j["grad_norm"].get<double>();
    metrics.loss_scale[step] = j["loss_scale"].get<double>();
    metrics.skipped[step] = j["skipped"].get<bool>();
  }
  return metrics;
}

// The steps an fp16 overflow skipped.
std::set<int64_t> skipped_steps(const Metrics& metrics) {
  std::set<int64_t> steps;
  for (const auto& [step, skipped] : metrics.skipped) {
    if (skipped) steps.insert(step);
  }
  return steps;
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

// How far a run may be from the single-process one. Losses (and gradient norms): relative, per
// step. Weights: per element, |a - b| <= weight * max(|a|, weight_floor).
struct Tolerances {
  double loss = kLossTolerance;
  float weight = kWeightTolerance;
  float weight_floor = kWeightFloor;
};

// `run`'s steps 1..`through_step` against `reference`'s: the same steps logged, the same steps
// skipped and loss scales exactly (a skip is a decision every rank takes together, from the
// reduced gradients, never a rounding matter), losses and gradient norms within tolerance.
::testing::AssertionResult same_steps(const Metrics& reference, const Metrics& run,
                                      const Tolerances& tolerances, int64_t through_step = kSteps) {
  for (int64_t step = 1; step <= through_step; ++step) {
    if (!reference.loss.contains(step) || !run.loss.contains(step)) {
      return ::testing::AssertionFailure() << "step " << step << " is not logged by both runs";
    }
    const auto near = [&](double got, double want) {  // equal non-finite values included
      return (std::isnan(got) && std::isnan(want)) || got == want ||
             std::abs(got - want) <= tolerances.loss * std::abs(want);
    };
    if (!near(run.loss.at(step), reference.loss.at(step)) ||
        !near(run.grad_norm.at(step), reference.grad_norm.at(step)) ||
        run.skipped.at(step) != reference.skipped.at(step) ||
        run.loss_scale.at(step) != reference.loss_scale.at(step)) {
      return ::testing::AssertionFailure()
             << std::setprecision(9) << "step " << step << ": loss " << run.loss.at(step) << " vs "
             << reference.loss.at(step) << ", grad_norm " << run.grad_norm.at(step) << " vs "
             << reference.grad_norm.at(step) << ", skipped " << run.skipped.at(step) << " vs "
             << reference.skipped.at(step) << ", loss scale " << run.loss_scale.at(step) << " vs "
             << reference.loss_scale.at(step) << " (relative tolerance " << tolerances.loss << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

// The step-`step` checkpoints of two runs hold the same weights within tolerance.
::testing::AssertionResult same_weights(const fs::path& one, const fs::path& two,
                                        const Tolerances& tolerances, int64_t step = kSteps) {
  MemoryAccountant accountant;
  const LlamaWeights a = load_llama_checkpoint(checkpoint_directory(one / "checkpoints", step),
                                               DType::kF32, accountant);
  const LlamaWeights b = load_llama_checkpoint(checkpoint_directory(two / "checkpoints", step),
                                               DType::kF32, accountant);
  if (a.parameters().size() != b.parameters().size()) {
    return ::testing::AssertionFailure() << "different parameter lists";
  }
  for (size_t p = 0; p < a.parameters().size(); ++p) {
    const Parameter& pa = a.parameters()[p];
    const Parameter& pb = b.parameters()[p];
    if (pa.numel() != pb.numel()) return ::testing::AssertionFailure() << pa.name << ": shapes";
    float worst = 0.0f;  // the largest |a - b| / max(|a|, floor)
    for (int64_t i = 0; i < pa.numel(); ++i) {
      const float x = pa.storage.as<float>()[i];
      const float y = pb.storage.as<float>()[i];
      worst = std::max(worst, std::abs(x - y) / std::max(std::abs(x), tolerances.weight_floor));
    }
    if (worst > tolerances.weight) {
      return ::testing::AssertionFailure()
             << pa.name << " differs by " << worst << " relative, tolerance " << tolerances.weight;
    }
  }
  return ::testing::AssertionSuccess();
}

void expect_same_final_weights(const fs::path& one, const fs::path& two) {
  EXPECT_TRUE(same_weights(one, two, Tolerances{}));
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

// One optimizer path of the claim: the spec's overrides, what makes the path do what it is there
// for (clipping active; overflows skipped), and how near the gangs must stay.
struct OptimizerPath {
  std::string name;
  std::vector<std::string> overrides;
  std::optional<double> clip_grad_norm;  // the reference's gradient norm exceeds it at every step
  std::set<int64_t> skipped;             // the reference's skipped steps
  Tolerances tolerances;
};

void PrintTo(const OptimizerPath& path, std::ostream* out) { *out << path.name; }

class TrajectoryTest : public StandaloneDataParallelTest,
                       public ::testing::WithParamInterface<OptimizerPath> {};

// Each world size's run must succeed, which says more than it seems: the trainer all-gathers a
// hash of every rank's weights at the start and at each checkpoint (steps 3 and 6) and fails the
// run naming the ranks that differ, so success means the ranks' weights were bit-identical to
// each other after 3 and after 6 steps. Then the run must follow the single-process one: per-step
// loss and gradient norm, skipped steps and loss scales, and the final weights.
TEST_P(TrajectoryTest, WorldSizesTwoAndFourFollowTheSingleProcessRun) {
  const OptimizerPath& path = GetParam();
  train(job("one", 1, path.overrides));
  const Metrics reference = read_metrics(output("one"));
  ASSERT_EQ(reference.loss.size(), static_cast<size_t>(kSteps));
  // The trajectory is not trivially equal: training moved the loss.
  EXPECT_NE(reference.loss.at(1), reference.loss.at(kSteps));
  if (path.clip_grad_norm) {
    for (const auto& [step, norm] : reference.grad_norm) {
      EXPECT_GT(norm, *path.clip_grad_norm) << "clipping is not active at step " << step;
    }
  }
  EXPECT_EQ(skipped_steps(reference), path.skipped);
  for (const int world_size : {2, 4}) {
    SCOPED_TRACE("world size " + std::to_string(world_size));
    const std::string name = "world-" + std::to_string(world_size);
    train(job(name, world_size, path.overrides), {"--nproc", std::to_string(world_size)});
    EXPECT_TRUE(fs::exists(checkpoint_directory(output(name) / "checkpoints", 3)))
        << "no mid-run checkpoint: the ranks' weights were not compared there";
    EXPECT_TRUE(same_steps(reference, read_metrics(output(name)), path.tolerances));
    EXPECT_TRUE(same_weights(output("one"), output(name), path.tolerances));
  }
}

// fp16 loss scaling whose overflows do not depend on how the batch is split: a scale of 2^60
// overflows every rank's fp16 gradient at any world size (any element above 6e-14 does), and the
// overflow divides it by 2^50 to 1024, far from overflow (the gradient's norm, hence every element,
// stays under 5 here: 5 x 1024 is well below fp16's 65504). After 3 clean steps it grows back to
// 2^60: steps 1 and 5 are skipped, the second after the step-3 checkpoint. (That one rank's
// overflow alone skips the step on all ranks is data_parallel_test's, with ranks on threads.)
const std::vector<std::string> kFp16LossScaling = {
    "optimizer.name=lomo",
    "optimizer.lr=0.05",
    "precision.dtype=fp16",
    "precision.loss_scale.initial=1152921504606846976",
    "precision.loss_scale.factor=1125899906842624",
    "precision.loss_scale.growth_interval=3",
    "precision.loss_scale.min=1",
};

// Measured over the 6 steps at world sizes 2 and 4 (relative): losses within 9.2e-9 and gradient
// norms within 6.7e-8 on the fp32 paths, well inside kLossTolerance (1e-6). Weights: AdaLomo
// within 2.8e-7, inside kWeightTolerance; LOMO's raw-gradient steps (lr x gradient, no
// normalisation) carry the gradients' last-bit differences straight into the weights, 5.2e-7
// (1.9e-7 clipped), so the LOMO paths allow 2e-6 (about 16 fp32 ulps). A broken reduction moves the
// next step's loss by 1e-2 (ABrokenReduction... below), four orders beyond.
constexpr Tolerances kLomoTolerances{kLossTolerance, 2e-6f, kWeightFloor};
// fp16 storage: each rank rounds its partial gradient to fp16 before the sum where one process
// rounds the summed gradient, so gradients differ by up to ~1e-3 relative and an update may round
// a weight to a neighbouring fp16 value (one fp16 ulp is 4.9e-4 to 9.8e-4 of the value; 1.5e-5
// absolute at the weights' scale 0.02). Measured: losses within 9.7e-6 and norms within 4.3e-5
// relative, weights within 2 ulps (6.1e-5 at |w| ~ 0.04, i.e. 1.2e-3 of the 0.05 floor). Allowed:
// losses and norms 3e-4 relative; weights 3e-3 of max(|w|, 0.05), i.e. at least 3 ulps at every
// magnitude. The weight bound is coarse next to what a broken reduction does to a weight in a step
// (~lr x |gradient| ~ 1e-4 absolute): for fp16 the per-step losses are the sharp check.
constexpr Tolerances kFp16Tolerances{3e-4, 3e-3f, 0.05f};

INSTANTIATE_TEST_SUITE_P(
    OptimizerPaths, TrajectoryTest,
    ::testing::Values(
        OptimizerPath{
            "Lomo", {"optimizer.name=lomo", "optimizer.lr=0.05"}, {}, {}, kLomoTolerances},
        OptimizerPath{"LomoClipGradNorm",
                      {"optimizer.name=lomo", "optimizer.lr=0.05", "optimizer.clip_grad_norm=0.5"},
                      0.5,
                      {},
                      kLomoTolerances},
        OptimizerPath{"AdaLomo", {"optimizer.name=adalomo"}, {}, {}, {}},
        OptimizerPath{"Fp16LossScaledLomo", kFp16LossScaling, {}, {1, 5}, kFp16Tolerances}),
    [](const ::testing::TestParamInfo<OptimizerPath>& info) { return info.param.name; });

// The comparison above can fail. With the LOMO_TEST_FAULT hook the last rank takes part in every
// gradient all-reduce but keeps its own gradient, so its replica drifts from step 1's update on:
// the global loss of step 2 (which sums its share) is off by ~1e-2 relative (10^4 tolerances),
// and at the step-3 checkpoint the trainer's weight-hash check fails the launch naming the last
// rank.
TEST_F(StandaloneDataParallelTest, ABrokenReductionFailsTheComparisonAndTheRanksWeightCheck) {
  const std::vector<std::string> lomo = {"optimizer.name=lomo", "optimizer.lr=0.05"};
  train(job("one", 1, lomo));
  const Metrics reference = read_metrics(output("one"));
  for (const int world_size : {2, 4}) {
    SCOPED_TRACE("world size " + std::to_string(world_size));
    const std::string name = "broken-" + std::to_string(world_size);
    const fs::path protocol_file = dir_.path() / (name + ".protocol.jsonl");
    std::string log;
    const ExitStatus status = run_program(
        {kWorker.string(), "train", job(name, world_size, lomo).string(), "--nproc",
         std::to_string(world_size), "--protocol-file", protocol_file.string()},
        &log, seconds(60), {"OMP_NUM_THREADS=1", "LOMO_TEST_FAULT=break_all_reduce_on_last_rank"});
    EXPECT_FALSE(status.signaled) << log;
    EXPECT_EQ(status.code, trainer_protocol::kExitFailed) << log;
    const std::string last_rank = std::to_string(world_size - 1);
    const trainer_protocol::Outcome ended = last_outcome(protocol_file);
    EXPECT_EQ(ended.status, trainer_protocol::Status::kFailed);
    EXPECT_THAT(ended.reason, HasSubstr("data-parallel ranks hold different weights at step 3: "
                                        "rank(s) " +
                                        last_rank + " ("));
    EXPECT_EQ(ended.steps_done, 3);
    // Steps 1 to 3 were logged before the check; the same comparison as above rejects them.
    const Metrics broken = read_metrics(output(name));
    ASSERT_EQ(broken.loss.size(), 3u) << log;
    EXPECT_TRUE(same_steps(reference, broken, Tolerances{}, 1)) << "the same start";
    const ::testing::AssertionResult compared = same_steps(reference, broken, Tolerances{}, 3);
    EXPECT_FALSE(compared);
    EXPECT_THAT(compared.message(), HasSubstr("step 2: loss"));
  }
}

// An unknown fault name is refused: a misspelt hook must not run a test that checks nothing.
TEST_F(StandaloneDataParallelTest, AnUnknownTestFaultFailsTheRun) {
  std::string log;
  const ExitStatus status =
      run_program({kWorker.string(), "train", job("typo", 2).string()}, &log, seconds(60),
                  {"OMP_NUM_THREADS=1", "LOMO_TEST_FAULT=break_all_reduce"});
  EXPECT_EQ(status.code, trainer_protocol::kExitFailed) << status.describe() << "\n" << log;
  EXPECT_THAT(log, HasSubstr("LOMO_TEST_FAULT=break_all_reduce: unknown fault"));
  EXPECT_FALSE(fs::exists(output("typo") / "metrics.jsonl"));
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

// A rank that dies (SIGKILL: no error of its own, no goodbye to its peers) fails the launch at
// once: rank 0's next collective sees the broken connection and reports it naming the peer, the
// launcher ends what is left and exits 1, leaving no rank behind. The bound is far below the
// 10-minute collective timeout, so the timeout cannot be what ends the run.
TEST_F(LaunchFailureTest, AKilledRankFailsTheLaunchQuicklyAndLeavesNoRankRunning) {
  std::unique_ptr<ChildProcess> launcher = start_and_wait_for_steps(2);
  ASSERT_TRUE(launcher->running());
  std::map<int, pid_t> rank_pids;  // rank -> pid, from the ranks' --rank flags
  std::string rendezvous;  // the launch's rendezvous directory, on every rank's command line
  for (const pid_t pid : children(launcher->pid())) {
    const std::string line = command_line(pid);
    const size_t rank_at = line.find("--rank ");
    const size_t rendezvous_at = line.find("--rendezvous ");
    ASSERT_NE(rank_at, std::string::npos) << line;
    ASSERT_NE(rendezvous_at, std::string::npos) << line;
    rank_pids[std::stoi(line.substr(rank_at + 7))] = pid;
    rendezvous =
        line.substr(rendezvous_at + 13, line.find(' ', rendezvous_at + 13) - rendezvous_at - 13);
  }
  ASSERT_EQ(rank_pids.size(), 2u);
  ASSERT_THAT(rendezvous, HasSubstr("lomo-rendezvous-"));

  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(rank_pids.at(1), SIGKILL), 0);
  const std::optional<ExitStatus> status = launcher->wait_for(seconds(60));
  ASSERT_TRUE(status.has_value()) << "the launcher still runs 60 s after rank 1 was killed:\n"
                                  << read_file(log_);
  const std::string log = read_file(log_);
  EXPECT_LT(std::chrono::steady_clock::now() - killed_at, seconds(60));
  EXPECT_FALSE(status->signaled) << log;
  EXPECT_EQ(status->code, trainer_protocol::kExitFailed) << log;
  // Which rank the launcher names first is a race: rank 0 may exit on the broken connection
  // before the launcher polls rank 1 ("rank 0 exited with code 1; stopping the other ranks").
  EXPECT_THAT(log, HasSubstr("; stopping the other ranks"));

  const trainer_protocol::Outcome ended = outcome();
  EXPECT_EQ(ended.status, trainer_protocol::Status::kFailed);
  // The broken connection, not the collective timeout ("rank 1 did not ... within ... ms").
  EXPECT_THAT(ended.reason, HasSubstr("connection to rank 1 failed"));
  EXPECT_THAT(ended.reason, HasSubstr("(peer rank 1)"));
  EXPECT_THAT(ended.reason, Not(HasSubstr(" within ")));
  EXPECT_LT(ended.steps_done, kLongSteps);

  EXPECT_THAT(processes_mentioning(rendezvous), IsEmpty()) << "a rank outlived the launcher";
  EXPECT_FALSE(fs::exists(rendezvous));
}

// resources.collective_timeout_seconds is what bounds a collective: a rank that stops answering
// (SIGSTOP: its connections stay open, so nothing but the clock can tell) fails its peer's next
// collective after 3 s, naming the rank and the timeout, instead of after the default 10 minutes.
TEST_F(LaunchFailureTest, ACollectiveWaitsForAStoppedRankOnlyAsLongAsTheSpecSays) {
  extra_args_ = {"--set", "resources.collective_timeout_seconds=3"};
  std::unique_ptr<ChildProcess> launcher = start_and_wait_for_steps(2);
  ASSERT_TRUE(launcher->running());
  pid_t rank_one = 0;
  for (const pid_t pid : children(launcher->pid())) {
    if (command_line(pid).find("--rank 1 ") != std::string::npos) rank_one = pid;
  }
  ASSERT_NE(rank_one, 0);
  const auto stopped_at = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(rank_one, SIGSTOP), 0);
  const std::optional<ExitStatus> status = launcher->wait_for(seconds(60));
  if (!status) ::kill(rank_one, SIGKILL);
  ASSERT_TRUE(status.has_value()) << "the launcher still runs 60 s after rank 1 was stopped:\n"
                                  << read_file(log_);
  const std::string log = read_file(log_);
  // 3 s of timeout, then the launcher's grace for the other rank and its SIGTERM/SIGKILL of the
  // stopped one: far below the 10-minute default either way.
  EXPECT_LT(std::chrono::steady_clock::now() - stopped_at, seconds(45)) << log;
  EXPECT_EQ(status->code, trainer_protocol::kExitFailed) << log;
  const trainer_protocol::Outcome ended = outcome();
  EXPECT_EQ(ended.status, trainer_protocol::Status::kFailed);
  EXPECT_THAT(ended.reason, HasSubstr("rank 1")) << ended.reason;
  EXPECT_THAT(ended.reason, HasSubstr("within 3000 ms")) << ended.reason;
}

// Ctrl-C reaches the launcher alone (its ranks have their own process groups); it forwards it,
// the ranks agree on a step to stop after, rank 0 checkpoints it, and the launcher exits 6. The
// same command then resumes there on both ranks and runs to the end, each step logged once.
TEST_F(LaunchFailureTest, CtrlCStopsEveryRankAfterOneCheckpointedStepAndTheSameCommandResumes) {
  std::unique_ptr<ChildProcess> launcher = start_and_wait_for_steps(2);
  ASSERT_TRUE(launcher->running());
  ASSERT_EQ(::kill(launcher->pid(), SIGINT), 0);
  const std::optional<ExitStatus> status = launcher->wait_for(seconds(30));
  ASSERT_TRUE(status.has_value()) << read_file(log_);
  const std::string log = read_file(log_);
  EXPECT_FALSE(status->signaled) << log;
  ASSERT_EQ(status->code, trainer_protocol::kExitInterrupted) << log;

  const trainer_protocol::Outcome ended = outcome();
  EXPECT_EQ(ended.status, trainer_protocol::Status::kInterrupted);
  const int64_t stop = ended.steps_done;
  ASSERT_GE(stop, 2);
  ASSERT_LT(stop, kLongSteps) << "the signal landed after the last step";
  // Rank 1's own report goes nowhere the test can read but its errors reach this log: a rank that
  // stopped after another step would fail the stop checkpoint's weight comparison or its barrier.
  EXPECT_THAT(log, HasSubstr("stopped at step " + std::to_string(stop) + " of " +
                             std::to_string(kLongSteps)));
  EXPECT_THAT(log, Not(HasSubstr("rank 1")));
  EXPECT_EQ(steps_logged(), stop);
  const fs::path checkpoints = output("run") / "checkpoints";
  EXPECT_TRUE(fs::exists(checkpoint_directory(checkpoints, stop)));

  std::string resumed_log;
  const ExitStatus resumed = run_program(argv(), &resumed_log, seconds(60), kEnv);
  ASSERT_TRUE(resumed.success()) << resumed.describe() << "\n" << resumed_log;
  EXPECT_THAT(resumed_log, HasSubstr("at step " + std::to_string(stop)));
  EXPECT_EQ(outcome().status, trainer_protocol::Status::kSucceeded);
  EXPECT_TRUE(fs::exists(checkpoint_directory(checkpoints, kLongSteps)));
  const Metrics metrics = read_metrics(output("run"));  // fails on a step logged twice
  EXPECT_EQ(metrics.loss.size(), static_cast<size_t>(kLongSteps));
  EXPECT_EQ(metrics.loss.rbegin()->first, kLongSteps);
}

// Whether `pid` takes `signal` itself instead of dying of it: a handler installed (SigCgt of
// /proc/<pid>/status) or, as the trainer does, the signal blocked for a sigwait thread (SigBlk of
// its main thread, which every later thread inherits).
bool catches(pid_t pid, int signal) {
  std::ifstream in(fs::path("/proc") / std::to_string(pid) / "status");
  bool taken = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("SigCgt:", 0) == 0 || line.rfind("SigBlk:", 0) == 0) {
      taken = taken || ((std::stoull(line.substr(7), nullptr, 16) >> (signal - 1)) & 1) != 0;
    }
  }
  return taken;
}

// The launcher's rank processes by rank, once all `n` have started (empty after 20 s).
std::map<int, pid_t> wait_for_ranks(pid_t launcher, int n) {
  std::map<int, pid_t> ranks;
  const bool started = wait_until(
      [&] {
        ranks.clear();
        for (const pid_t pid : children(launcher)) {
          const std::string line = command_line(pid);
          const size_t at = line.find("--rank ");
          if (at != std::string::npos) ranks[std::stoi(line.substr(at + 7))] = pid;
        }
        return static_cast<int>(ranks.size()) == n;
      },
      seconds(20));
  return started ? ranks : std::map<int, pid_t>{};
}

// A stop request that reaches a rank while it waits for its peers (here: rank 0 is held with
// SIGSTOP, so rank 1 cannot finish the rendezvous) is kept, not fatal: rank 1 has its handler
// before the rendezvous, and once rank 0 goes on, both stop after the same first step, rank 0
// checkpoints it, and the launch ends interrupted (6) with no rank killed.
TEST_F(LaunchFailureTest, ASignalDuringTheRendezvousStopsTheRankInsteadOfKillingIt) {
  std::unique_ptr<ChildProcess> launcher = start_program(argv(), log_, kEnv);
  const std::map<int, pid_t> ranks = wait_for_ranks(launcher->pid(), 2);
  ASSERT_EQ(ranks.size(), 2u) << read_file(log_);
  ASSERT_EQ(::kill(ranks.at(0), SIGSTOP), 0);
  const bool handler_ready = wait_until([&] { return catches(ranks.at(1), SIGTERM); }, seconds(20));
  EXPECT_TRUE(handler_ready) << "rank 1 does not take SIGTERM itself while waiting for rank 0";
  ASSERT_EQ(::kill(ranks.at(1), SIGTERM), 0);
  ASSERT_EQ(::kill(ranks.at(0), SIGCONT), 0);

  const std::optional<ExitStatus> status = launcher->wait_for(seconds(60));
  ASSERT_TRUE(status.has_value()) << read_file(log_);
  const std::string log = read_file(log_);
  EXPECT_FALSE(status->signaled) << log;
  EXPECT_EQ(status->code, trainer_protocol::kExitInterrupted) << log;
  EXPECT_THAT(log, Not(HasSubstr("killed by")));
  const trainer_protocol::Outcome ended = outcome();
  EXPECT_EQ(ended.status, trainer_protocol::Status::kInterrupted);
  EXPECT_GE(ended.steps_done, 1);
  EXPECT_LT(ended.steps_done, kLongSteps);
  EXPECT_TRUE(fs::exists(checkpoint_directory(output("run") / "checkpoints", ended.steps_done)));
}

// The flags that start one rank of a gang only make sense together; any other mix is a usage
// error (exit 2) that says what is missing or contradictory, before anything is loaded.
TEST_F(StandaloneDataParallelTest, RankFlagsThatDoNotGoTogetherAreUsageErrors) {
  const std::string job_file = job("flags", 2).string();
  const std::vector<std::string> gang = {"--rank", "1", "--world-size", "2"};
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--rank", "0", "--rendezvous", "/tmp/x"}, "--rank 0 needs --world-size above it"},
      {{"--rank", "2", "--world-size", "2", "--rendezvous", "/tmp/x"},
       "--rank 2 needs --world-size above it"},
      {gang, "--rank needs --rendezvous"},
      {{"--world-size", "2"}, "need --rank"},
      {{"--job-id", "j"}, "need --rank"},
      {{"--nproc", "2", "--rank", "0", "--world-size", "2", "--rendezvous", "/tmp/x"},
       "--nproc launches ranks; it cannot be given with --rank"},
      {{"--rendezvous", "coordinator://127.0.0.1:1", "--job-id", "j"},
       "needs --worker-id, --job-id and --attempt (missing: --worker-id, --attempt)"},
      {{"--rendezvous", "coordinator://nowhere", "--worker-id", "w", "--job-id", "j", "--attempt",
        "1"},
       "expected coordinator://HOST:PORT"},
      {{"--rendezvous", "/tmp/x", "--worker-id", "w"}, "not a rendezvous directory"},
      {{"--rendezvous", "coordinator://h:1", "--worker-id", "w", "--job-id", "j", "--attempt", "0"},
       "--attempt: expected an attempt number >= 1"},
  };
  for (const auto& [flags, expected] : cases) {
    std::vector<std::string> argv{kWorker.string(), "train", job_file};
    const bool with_gang = flags.front() != "--rank" && flags.front() != "--world-size" &&
                           flags.front() != "--job-id" && flags.front() != "--nproc";
    if (with_gang) argv.insert(argv.end(), gang.begin(), gang.end());
    argv.insert(argv.end(), flags.begin(), flags.end());
    std::string log;
    const ExitStatus status = run_program(argv, &log, seconds(30), kEnv);
    EXPECT_EQ(status.code, trainer_protocol::kExitUsage) << status.describe() << "\n" << log;
    EXPECT_THAT(log, HasSubstr(expected));
    EXPECT_FALSE(fs::exists(output("flags"))) << "a bad command line started training";
  }
}

}  // namespace
}  // namespace lomo::testing
