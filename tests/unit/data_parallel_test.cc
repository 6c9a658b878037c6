// Data-parallel steps at the library level: the same tiny model replicated on world sizes 1, 2
// and 4 (ranks on threads, make_in_process_world), the global batch split into contiguous row
// slices whose padding differs so that ranks count different numbers of tokens. The claim
// (issue 9, deliverable 1): every world size follows the single-process trajectory of the global
// batch — per-step losses and final weights — within fp32 summation-order tolerance, for LOMO,
// LOMO + clip_grad_norm, AdaLomo and fp16 with loss scaling; an fp16 overflow on one rank skips
// the step on every rank; the ranks' weights are bit-identical to each other; and a broken
// reduction is caught by the same check.
#include "worker/optim/data_parallel.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tests/unit/tiny_model.h"
#include "worker/comm/metered_communicator.h"

#ifdef LOMO_HAVE_GLOO
#include <gloo/rendezvous/hash_store.h>

#include "worker/comm/gloo_communicator.h"
#endif
#include "worker/comm/communicator.h"
#include "worker/comm/fault_injection.h"
#include "worker/comm/in_process_communicator.h"
#include "worker/comm/local_communicator.h"
#include "worker/engine/llama_model.h"
#include "worker/optim/optimizer.h"

namespace lomo {
namespace {

using Kind = OptimizerOptions::Kind;
using Weights = std::map<std::string, std::vector<float>>;

constexpr int64_t kGlobalRows = 4;  // divisible by every world size tested
constexpr int64_t kSeqLen = 8;
constexpr int kSteps = 6;

// The global batch of a step. Row r ends in (r·(r + 2) + step) % 7 padding positions (input 0,
// target ignored), so the rows — and the ranks' slices at world size 2 and 4 — count different
// numbers of tokens at every step (e.g. 11 and 12 at step 1, 12 and 6 at step 4).
TokenBatch global_batch(int step) {
  TokenBatch b;
  b.batch_size = kGlobalRows;
  b.seq_len = kSeqLen;
  for (int64_t r = 0; r < kGlobalRows; ++r) {
    const int64_t padding = (r * (r + 2) + step) % 7;
    for (int64_t t = 0; t < kSeqLen; ++t) {
      const bool pad = t >= kSeqLen - padding;
      const int64_t i = r * kSeqLen + t;
      b.input_ids.push_back(pad ? 0 : static_cast<int32_t>((i * 7 + step * 3 + 1) % 17));
      b.targets.push_back(pad ? kIgnoreIndex : static_cast<int32_t>((i * 5 + step) % 17));
    }
  }
  return b;
}

// Rank `rank`'s contiguous share of the global batch's rows.
TokenBatch rank_slice(const TokenBatch& global, int rank, int world_size) {
  const int64_t rows = global.batch_size / world_size;
  const auto first = static_cast<ptrdiff_t>(rank * rows * global.seq_len);
  const auto last = first + static_cast<ptrdiff_t>(rows * global.seq_len);
  TokenBatch b;
  b.batch_size = rows;
  b.seq_len = global.seq_len;
  b.input_ids.assign(global.input_ids.begin() + first, global.input_ids.begin() + last);
  b.targets.assign(global.targets.begin() + first, global.targets.begin() + last);
  return b;
}

// ---- Test communicators wrapping a real one ---------------------------------------------------
// ForwardingCommunicator and the last rank's broken reduction are shared with lomo-worker's
// LOMO_TEST_FAULT hook (worker/comm/fault_injection.h); the only f32 all-reduces of a step are
// the gradients'.

// Stands for an fp16 overflow in this rank's gradient: when armed, the next gradient this rank
// contributes to the sum carries +inf, as round_gradient_to_dtype makes of a value beyond 65504.
class OverflowingCommunicator final : public ForwardingCommunicator {
 public:
  using ForwardingCommunicator::ForwardingCommunicator;
  void arm() { armed_ = true; }

 protected:
  std::unique_ptr<CollectiveWork> f32_all_reduce(float* data, int64_t count, ReduceOp op) override {
    if (armed_ && count > 0) {
      data[0] = std::numeric_limits<float>::infinity();
      armed_ = false;
    }
    return ForwardingCommunicator::f32_all_reduce(data, count, op);
  }

 private:
  bool armed_ = false;
};

// Broken reductions for the negative tests.
enum class Breakage {
  kNone,
  kLocalValueOnLastRank,  // the last rank takes part but keeps its own gradient
  kMeanInsteadOfSum,      // every rank divides by the world size: ranks agree, but wrongly
};

class MeanInsteadOfSumCommunicator final : public ForwardingCommunicator {
 public:
  using ForwardingCommunicator::ForwardingCommunicator;

 protected:
  std::unique_ptr<CollectiveWork> f32_all_reduce(float* data, int64_t count, ReduceOp) override {
    return ForwardingCommunicator::f32_all_reduce(data, count, ReduceOp::kMean);
  }
};

// `communicator` with `breakage` (always wrapped, so every scenario runs the same layers).
std::unique_ptr<Communicator> broken(std::unique_ptr<Communicator> communicator,
                                     Breakage breakage) {
  switch (breakage) {
    case Breakage::kLocalValueOnLastRank:
      return std::make_unique<LocalValueOnLastRankCommunicator>(std::move(communicator));
    case Breakage::kMeanInsteadOfSum:
      return std::make_unique<MeanInsteadOfSumCommunicator>(std::move(communicator));
    case Breakage::kNone:
      break;
  }
  return std::make_unique<ForwardingCommunicator>(std::move(communicator));
}

// ---- Running one world ------------------------------------------------------------------------

struct Scenario {
  OptimizerOptions options;
  DType dtype = DType::kF32;
  double lr = 0.05;
  std::optional<int> overflow_step;  // the last rank's gradient overflows at this step
  Breakage breakage = Breakage::kNone;
};

Scenario make_scenario(const OptimizerOptions& options, DType dtype = DType::kF32, double lr = 0.05,
                       std::optional<int> overflow_step = std::nullopt) {
  Scenario s;
  s.options = options;
  s.dtype = dtype;
  s.lr = lr;
  s.overflow_step = overflow_step;
  return s;
}

struct RankRun {
  std::vector<double> losses;
  std::vector<int64_t> tokens;
  std::vector<bool> skipped;
  std::vector<double> loss_scales;
  Weights weights;
};

// One rank's whole run, on the calling thread.
RankRun run_rank(const Scenario& scenario, int rank, int world_size,
                 std::unique_ptr<Communicator> communicator) {
  // One OpenMP thread per rank: the ranks share the machine's cores, as one-thread ranks would.
  omp_set_num_threads(1);
  OverflowingCommunicator overflow(broken(std::move(communicator), scenario.breakage));
  TinyReplica replica(scenario.dtype);  // the same seed on every rank: identical at the start
  LlamaWeights& weights = replica.weights;
  LlamaModel& model = replica.model;
  auto optimizer = make_optimizer(scenario.options, weights, replica.accountant, &overflow);
  RankRun run;
  for (int step = 1; step <= kSteps; ++step) {
    if (scenario.overflow_step == step && rank == world_size - 1) overflow.arm();
    model.forward(rank_slice(global_batch(step), rank, world_size));
    const StepResult result = optimizer->step(model, step, scenario.lr);
    run.losses.push_back(result.loss);
    run.tokens.push_back(result.tokens);
    run.skipped.push_back(result.skipped);
    run.loss_scales.push_back(result.loss_scale);
  }
  run.weights = snapshot(weights);
  return run;
}

// Every rank of a world of `world_size`, each on its own thread. World 1 uses LocalCommunicator:
// the single-process path the trainer takes today.
std::vector<RankRun> run_world(const Scenario& scenario, int world_size) {
  std::vector<std::unique_ptr<Communicator>> communicators;
  if (world_size == 1) {
    communicators.push_back(std::make_unique<LocalCommunicator>());
  } else {
    communicators = make_in_process_world(world_size, std::chrono::seconds(20));
  }
  std::vector<RankRun> runs(static_cast<size_t>(world_size));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world_size));
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r, communicator = std::move(communicators[r])]() mutable {
      try {
        runs[r] = run_rank(scenario, r, world_size, std::move(communicator));
      } catch (...) {
        errors[r] = std::current_exception();  // its communicator is closed: peers fail too
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  return runs;
}

// ---- The checks -------------------------------------------------------------------------------

// |got − want| ≤ absolute + relative·|want|.
struct Tolerance {
  double absolute;
  double relative;
  bool holds(double got, double want) const {
    return std::abs(got - want) <= absolute + relative * std::abs(want);
  }
};

// Every rank of `world` against the single-process run: the same skipped steps and loss scales
// exactly, and the same global token counts; losses and weights within the tolerances.
testing::AssertionResult follows_reference(const RankRun& reference,
                                           const std::vector<RankRun>& world, Tolerance loss,
                                           Tolerance weight) {
  for (size_t r = 0; r < world.size(); ++r) {
    const RankRun& run = world[r];
    for (size_t s = 0; s < run.losses.size(); ++s) {
      if (run.skipped[s] != reference.skipped[s] ||
          run.loss_scales[s] != reference.loss_scales[s] || run.tokens[s] != reference.tokens[s] ||
          !loss.holds(run.losses[s], reference.losses[s])) {
        return testing::AssertionFailure()
               << "rank " << r << " step " << s + 1 << ": loss " << run.losses[s] << " vs "
               << reference.losses[s] << ", tokens " << run.tokens[s] << " vs "
               << reference.tokens[s] << ", skipped " << run.skipped[s] << " vs "
               << reference.skipped[s] << ", loss scale " << run.loss_scales[s] << " vs "
               << reference.loss_scales[s];
      }
    }
    for (const auto& [name, want] : reference.weights) {
      const std::vector<float>& got = run.weights.at(name);
      for (size_t i = 0; i < want.size(); ++i) {
        if (!weight.holds(got[i], want[i])) {
          return testing::AssertionFailure()
                 << "rank " << r << " " << name << "[" << i << "]: " << got[i] << " vs " << want[i];
        }
      }
    }
  }
  return testing::AssertionSuccess();
}

// Every rank's weights and reported losses bit for bit equal to rank 0's.
testing::AssertionResult ranks_identical(const std::vector<RankRun>& world) {
  for (size_t r = 1; r < world.size(); ++r) {
    for (size_t s = 0; s < world[r].losses.size(); ++s) {
      if (std::bit_cast<uint64_t>(world[r].losses[s]) !=
          std::bit_cast<uint64_t>(world[0].losses[s])) {
        return testing::AssertionFailure() << "rank " << r << " step " << s + 1 << " loss differs";
      }
    }
    for (const auto& [name, want] : world[0].weights) {
      const std::vector<float>& got = world[r].weights.at(name);
      for (size_t i = 0; i < want.size(); ++i) {
        if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i])) {
          return testing::AssertionFailure() << "rank " << r << " " << name << "[" << i
                                             << "]: " << got[i] << " vs rank 0's " << want[i];
        }
      }
    }
  }
  return testing::AssertionSuccess();
}

// fp32 storage: world N sums N partial gradients (and loss sums) where world 1's matmuls sum all
// rows at once, so each step's gradient differs in the last bits, and the differences carry into
// later steps. Measured over six steps at world 2 and 4: losses within 8e-8 relative, weights
// (|w| ≲ 1) within 1.7e-7 absolute (a few fp32 ulps), for all three fp32 cases. The tolerances
// leave six times that or more; the broken reductions below are off by 1e-2 in the loss and 4e-2 in
// the weights.
constexpr Tolerance kF32Loss{0.0, 1e-6};
constexpr Tolerance kF32Weight{1e-6, 1e-6};

struct Case {
  const char* name;
  Scenario scenario;
  Tolerance loss, weight;
};

class DataParallelTest : public testing::TestWithParam<Case> {};

TEST_P(DataParallelTest, EveryWorldSizeFollowsTheSingleProcessTrajectory) {
  const Case& c = GetParam();
  const std::vector<RankRun> reference = run_world(c.scenario, 1);
  for (int world_size : {2, 4}) {
    SCOPED_TRACE("world size " + std::to_string(world_size));
    const std::vector<RankRun> world = run_world(c.scenario, world_size);
    EXPECT_TRUE(follows_reference(reference[0], world, c.loss, c.weight));
    EXPECT_TRUE(ranks_identical(world));
  }
  // The trajectory is not trivially equal: training moved the weights and the loss.
  EXPECT_NE(reference[0].losses.front(), reference[0].losses.back());
}

OptimizerOptions options(Kind kind) {
  OptimizerOptions o;
  o.kind = kind;
  return o;
}

OptimizerOptions clipped_lomo() {
  OptimizerOptions o = options(Kind::kLomo);
  o.clip_grad_norm = 0.5;  // below this model's gradient norm (ClipIsActiveInTheClippedCase)
  return o;
}

OptimizerOptions fp16_lomo() {
  OptimizerOptions o = options(Kind::kLomo);
  o.loss_scaling = LossScalerOptions{1024.0, 2, 2.0, 1.0};  // grows every 2 clean steps
  return o;
}

// fp16 storage: every rank rounds its partial gradient to fp16 before the sum (as a GPU holding
// fp16 gradients does) where world 1 rounds the summed one, so gradients differ by up to ~1e-3
// relative, and an update may round a weight to the neighbouring fp16 value. Measured: weights
// within one fp16 ulp (4.9e-4 = 2⁻¹¹, at 0.5 ≤ |w| < 1), losses within 3.4e-5 relative. Allowed:
// two ulps or more at every magnitude (1e-4 + 2e-3·|w|), losses 3e-4 relative.
constexpr Tolerance kF16Loss{0.0, 3e-4};
constexpr Tolerance kF16Weight{1e-4, 2e-3};

INSTANTIATE_TEST_SUITE_P(
    Optimizers, DataParallelTest,
    testing::Values(Case{"Lomo", make_scenario(options(Kind::kLomo)), kF32Loss, kF32Weight},
                    Case{"LomoClipGradNorm", make_scenario(clipped_lomo()), kF32Loss, kF32Weight},
                    Case{"AdaLomo", make_scenario(options(Kind::kAdaLomo), DType::kF32, 0.01),
                         kF32Loss, kF32Weight},
                    Case{"Fp16LossScaledLomoWithAnOverflowOnOneRank",
                         make_scenario(fp16_lomo(), DType::kF16, 0.05, 3), kF16Loss, kF16Weight}),
    [](const testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

TEST(DataParallel, ClipIsActiveInTheClippedCase) {
  // Otherwise LomoClipGradNorm would test nothing LOMO does not.
  Scenario scenario = make_scenario(clipped_lomo());
  TinyReplica replica;
  auto optimizer = make_optimizer(scenario.options, replica.weights, replica.accountant, nullptr);
  replica.model.forward(global_batch(1));
  EXPECT_GT(optimizer->step(replica.model, 1, scenario.lr).grad_norm,
            *scenario.options.clip_grad_norm);
}

TEST(DataParallel, AnOverflowOnOneRankSkipsTheStepOnEveryRank) {
  Scenario scenario = make_scenario(fp16_lomo(), DType::kF16, 0.05, 3);
  for (int world_size : {2, 4}) {
    const std::vector<RankRun> world = run_world(scenario, world_size);
    for (size_t r = 0; r < world.size(); ++r) {
      for (int s = 1; s <= kSteps; ++s) {
        EXPECT_EQ(world[r].skipped[static_cast<size_t>(s - 1)], s == 3)
            << "world " << world_size << " rank " << r << " step " << s;
      }
      // The scaler grew after steps 1–2 (2048), halved at the overflow, then grew after 4–5.
      EXPECT_EQ(world[r].loss_scales, (std::vector<double>{1024, 1024, 2048, 1024, 1024, 2048}))
          << "rank " << r;
    }
    EXPECT_TRUE(ranks_identical(world));
  }
}

TEST(DataParallel, RanksCountDifferentTokensAndTheStepReportsTheGlobalMean) {
  // The premise of the equal-trajectory test: the slices are unequal, so a mean of per-rank means
  // would weight tokens unequally.
  const TokenBatch global = global_batch(1);
  std::vector<int64_t> counts;
  for (int r = 0; r < 2; ++r) {
    const TokenBatch slice = rank_slice(global, r, 2);
    counts.push_back(std::count_if(slice.targets.begin(), slice.targets.end(),
                                   [](int32_t t) { return t != kIgnoreIndex; }));
  }
  EXPECT_NE(counts[0], counts[1]);
  const std::vector<RankRun> world = run_world(make_scenario(options(Kind::kLomo)), 2);
  EXPECT_EQ(world[0].tokens[0], counts[0] + counts[1]);
}

TEST(DataParallel, ReduceLossSumsTheCountAndTheLossOverRanks) {
  auto communicators = make_in_process_world(2, std::chrono::seconds(20));
  std::vector<GlobalLoss> results(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      ForwardResult local;
      local.counted_tokens = r == 0 ? 3 : 1;
      local.loss_sum = r == 0 ? 6.0 : 2.0;  // per-rank means 2.0 and 2.0; global mean 8/4
      results[static_cast<size_t>(r)] = reduce_loss(local, communicators[r].get());
    });
  }
  for (std::thread& t : threads) t.join();
  for (const GlobalLoss& g : results) {
    EXPECT_EQ(g.tokens, 4);
    EXPECT_EQ(g.loss_sum, 8.0);
    EXPECT_EQ(g.mean(), 2.0);
  }
}

// The check above must be able to fail: a broken reduction is caught.
TEST(DataParallel, ARankThatKeepsItsLocalGradientIsCaught) {
  Scenario broken = make_scenario(options(Kind::kLomo));
  broken.breakage = Breakage::kLocalValueOnLastRank;
  const std::vector<RankRun> reference = run_world(make_scenario(options(Kind::kLomo)), 1);
  const std::vector<RankRun> world = run_world(broken, 2);
  EXPECT_FALSE(follows_reference(reference[0], world, kF32Loss, kF32Weight));
  EXPECT_FALSE(ranks_identical(world));
}

TEST(DataParallel, AMeanInsteadOfASumKeepsRanksEqualButIsCaught) {
  // Ranks agree with each other, so only the comparison with one process can see it.
  Scenario broken = make_scenario(options(Kind::kLomo));
  broken.breakage = Breakage::kMeanInsteadOfSum;
  const std::vector<RankRun> reference = run_world(make_scenario(options(Kind::kLomo)), 1);
  const std::vector<RankRun> world = run_world(broken, 2);
  EXPECT_TRUE(ranks_identical(world));
  EXPECT_FALSE(follows_reference(reference[0], world, kF32Loss, kF32Weight));
}

// What a rank all-reduces in a LOMO step (the payload behind Metrics.communication_bytes and the
// bench's ring figure): every gradient once in f32, plus the global token count (i64) and loss sum
// (f64) — 4·(parameter count) + 16 bytes on every rank.
TEST(DataParallel, ALomoStepAllReducesEveryGradientOnceAndTheLossTotals) {
  std::vector<std::unique_ptr<Communicator>> world =
      make_in_process_world(2, std::chrono::seconds(20));
  std::vector<int64_t> bytes(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      omp_set_num_threads(1);
      MeteredCommunicator metered(*world[r]);
      TinyReplica replica;
      auto optimizer =
          make_optimizer(options(Kind::kLomo), replica.weights, replica.accountant, &metered);
      replica.model.forward(rank_slice(global_batch(1), r, 2));
      optimizer->step(replica.model, 1, 0.05);
      bytes[r] = metered.totals().all_reduce_bytes;
    });
  }
  for (auto& thread : threads) thread.join();
  const TinyReplica shape;
  int64_t parameters = 0;
  for (const Parameter& p : shape.weights.parameters()) parameters += p.numel();
  EXPECT_EQ(bytes[0], 4 * parameters + 16);
  EXPECT_EQ(bytes[1], 4 * parameters + 16);
}

#ifdef LOMO_HAVE_GLOO
// The two steps' memory reports of one rank: the run so far after step 1, and step 2 alone.
struct StepMemory {
  MemoryReport first;
  MemoryReport second;
};

// Two LOMO steps on `rank`'s rows of a 2-rank split; `communicator` null: one process alone on
// the same rows.
StepMemory lomo_steps_on_rows_of(int rank, Communicator* communicator) {
  omp_set_num_threads(1);
  TinyReplica replica;
  std::optional<CommunicationBufferAccounting> counted;
  if (communicator != nullptr) counted.emplace(*communicator, replica.accountant);
  auto optimizer =
      make_optimizer(options(Kind::kLomo), replica.weights, replica.accountant, communicator);
  StepMemory memory;
  replica.model.forward(rank_slice(global_batch(1), rank, 2));
  optimizer->step(replica.model, 1, 0.05);
  memory.first = replica.accountant.report();
  replica.accountant.reset_peaks();
  replica.model.forward(rank_slice(global_batch(2), rank, 2));
  optimizer->step(replica.model, 2, 0.05);
  memory.second = replica.accountant.report();
  return memory;
}

// Issue 9's memory claim, exactly and by kind: a rank of a 2-rank LOMO step holds what one process
// holds for the same rows (parameters, gradients, optimizer state, activations, workspace: the
// same bytes), plus the communicator's staging, which the accountant reports as "communication":
// the ring's outgoing and incoming chunk of the largest gradient, 2·⌈numel/2⌉ f32. Its peak adds
// to the total peak with nothing else: in the first step too, because the largest gradient is
// reduced before the step's peak (checked, not assumed: the first report is compared as well).
TEST(DataParallelMemory, ARankPeaksAtTheSingleProcessPeakPlusItsCommunicationBuffers) {
  gloo::rendezvous::HashStore store;
  std::vector<std::unique_ptr<GlooCommunicator>> world(2);
  {
    std::vector<std::thread> connecting;
    for (int r = 0; r < 2; ++r) {
      connecting.emplace_back([&, r] {
        GlooCommunicatorOptions o;
        o.rank = r;
        o.world_size = 2;
        o.prefix = "memory";
        o.timeout = std::chrono::seconds(30);
        world[r] = std::make_unique<GlooCommunicator>(o, store);
      });
    }
    for (auto& thread : connecting) thread.join();
  }
  std::vector<StepMemory> ranks(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] { ranks[r] = lomo_steps_on_rows_of(r, world[r].get()); });
  }
  for (auto& thread : threads) thread.join();

  const TinyReplica shape;
  int64_t largest = 0;
  for (const Parameter& p : shape.weights.parameters()) largest = std::max(largest, p.numel());
  const uint64_t staging = 2 * static_cast<uint64_t>((largest + 1) / 2) * sizeof(float);
  for (int r = 0; r < 2; ++r) {
    const StepMemory alone = lomo_steps_on_rows_of(r, nullptr);
    for (const auto& [window, gang, single] :
         {std::tuple{"step 1", ranks[r].first, alone.first},
          std::tuple{"step 2", ranks[r].second, alone.second}}) {
      SCOPED_TRACE(std::string("rank ") + std::to_string(r) + ", " + window);
      for (size_t k = 0; k < kMemoryKindCount; ++k) {
        const auto kind = static_cast<MemoryKind>(k);
        if (kind == MemoryKind::kCommunication) continue;
        EXPECT_EQ(gang.peak(kind), single.peak(kind)) << memory_kind_name(kind);
        EXPECT_EQ(gang.current(kind), single.current(kind)) << memory_kind_name(kind);
      }
      EXPECT_EQ(single.peak(MemoryKind::kCommunication), 0u);
      EXPECT_EQ(gang.peak(MemoryKind::kCommunication), staging);
      EXPECT_EQ(gang.current(MemoryKind::kCommunication), staging);
      EXPECT_EQ(gang.peak_total_bytes, single.peak_total_bytes + staging);
    }
  }
  // Detached (the accountings above are gone), closing counts nothing against anyone.
  world.clear();
}
#endif

}  // namespace
}  // namespace lomo
