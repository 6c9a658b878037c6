// One data-parallel LOMO step on the reference config (58M parameters at 8 layers), N ranks on
// threads of this process over GlooCommunicator (loopback TCP, as --nproc ranks talk), against
// one process with the same threads in total on the whole global batch. Per rank and step it prints
// what the trainer's metrics carry (step time, time in collectives and its share of the step,
// payload bytes all-reduced) and the bytes each rank's link carries by the ring formula
// 2·(N−1)/N·bytes; then each rank's peak memory by kind next to one process stepping the same rows,
// and whether "N-rank peak = 1-rank peak + communication buffers" holds exactly. Asserts nothing.
//
//   data_parallel_bench [--ranks N] [--layers L] [--rows R] [--seq S] [--steps K]
//                       [--threads T]    (R rows per rank; T threads in all, split across ranks)
#include <gloo/rendezvous/hash_store.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench/reference_workload.h"
#include "worker/comm/gloo_communicator.h"
#include "worker/comm/metered_communicator.h"
#include "worker/optim/optimizer.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Settings {
  int ranks = 2;
  int64_t layers = 8;
  int64_t rows = 2;  // per rank
  int64_t seq = 256;
  int steps = 3;
  int threads = 2;  // in all
};

struct StepFigures {
  double step_seconds = 0;
  double communication_seconds = 0;
  int64_t communication_bytes = 0;
};

struct RankRun {
  std::vector<StepFigures> steps;
  lomo::MemoryReport memory;
};

lomo::TokenBatch global_batch(const Settings& s) {
  return lomo::bench::random_batch(s.rows * s.ranks, s.seq,
                                   lomo::bench::reference_config().vocab_size);
}

// `rank`'s rows of the global batch of `ranks` × rows.
lomo::TokenBatch rows_of(const Settings& s, int rank) {
  const lomo::TokenBatch global = global_batch(s);
  lomo::TokenBatch b;
  b.batch_size = s.rows;
  b.seq_len = s.seq;
  const auto first = static_cast<ptrdiff_t>(rank * s.rows * s.seq);
  const auto last = first + static_cast<ptrdiff_t>(s.rows * s.seq);
  b.input_ids.assign(global.input_ids.begin() + first, global.input_ids.begin() + last);
  b.targets.assign(global.targets.begin() + first, global.targets.begin() + last);
  return b;
}

// LOMO steps of one rank on `batch` (communicator null: a process alone).
RankRun run_rank(const Settings& s, const lomo::TokenBatch& batch, lomo::Communicator* communicator,
                 int threads) {
  omp_set_num_threads(threads);
  lomo::MemoryAccountant accountant;
  lomo::LlamaWeights weights(lomo::bench::reference_config(s.layers), lomo::DType::kF32,
                             accountant);
  weights.init_random(1, 0.02f);
  lomo::LlamaModel model(weights, accountant);
  std::optional<lomo::MeteredCommunicator> metered;
  std::optional<lomo::CommunicationBufferAccounting> counted;
  if (communicator != nullptr) {
    metered.emplace(*communicator);
    counted.emplace(*metered, accountant);
  }
  lomo::OptimizerOptions options;
  options.kind = lomo::OptimizerOptions::Kind::kLomo;
  auto optimizer =
      lomo::make_optimizer(options, weights, accountant, metered ? &*metered : nullptr);
  RankRun run;
  for (int step = 1; step <= s.steps; ++step) {
    const lomo::CommunicationTotals before =
        metered ? metered->totals() : lomo::CommunicationTotals{};
    const auto start = Clock::now();
    model.forward(batch);
    optimizer->step(model, step, 1e-3);
    const lomo::CommunicationTotals after =
        metered ? metered->totals() : lomo::CommunicationTotals{};
    run.steps.push_back({std::chrono::duration<double>(Clock::now() - start).count(),
                         after.seconds - before.seconds,
                         after.all_reduce_bytes - before.all_reduce_bytes});
  }
  run.memory = accountant.report();
  return run;
}

std::vector<RankRun> run_gang(const Settings& s) {
  gloo::rendezvous::HashStore store;
  std::vector<std::unique_ptr<lomo::GlooCommunicator>> world(static_cast<size_t>(s.ranks));
  std::vector<RankRun> runs(static_cast<size_t>(s.ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < s.ranks; ++r) {
    threads.emplace_back([&, r] {
      lomo::GlooCommunicatorOptions o;
      o.rank = r;
      o.world_size = s.ranks;
      o.prefix = "bench";
      o.timeout = std::chrono::minutes(10);
      world[r] = std::make_unique<lomo::GlooCommunicator>(o, store);
      runs[r] = run_rank(s, rows_of(s, r), world[r].get(), std::max(1, s.threads / s.ranks));
    });
  }
  for (auto& thread : threads) thread.join();
  return runs;
}

double mib(uint64_t bytes) { return static_cast<double>(bytes) / 1048576.0; }

void print_memory(const char* who, const lomo::MemoryReport& m) {
  std::printf("  %-14s", who);
  for (size_t k = 0; k < lomo::kMemoryKindCount; ++k) std::printf(" %10.2f", mib(m.peak_bytes[k]));
  std::printf(" %10.2f\n", mib(m.peak_total_bytes));
}

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const long long value = std::stoll(argv[i + 1]);
    if (flag == "--ranks") s.ranks = static_cast<int>(value);
    if (flag == "--layers") s.layers = value;
    if (flag == "--rows") s.rows = value;
    if (flag == "--seq") s.seq = value;
    if (flag == "--steps") s.steps = static_cast<int>(value);
    if (flag == "--threads") s.threads = static_cast<int>(value);
  }
  std::printf(
      "reference config, %lld layers, LOMO fp32, %d ranks x %lld rows x %lld tokens, "
      "%d threads in all\n",
      static_cast<long long>(s.layers), s.ranks, static_cast<long long>(s.rows),
      static_cast<long long>(s.seq), s.threads);
  const std::vector<RankRun> gang = run_gang(s);
  // Time: one process with every thread on the whole global batch (1 rank × T threads).
  const RankRun alone = run_rank(s, global_batch(s), nullptr, s.threads);
  // Memory: one process on rank 0's rows and a rank's threads (the workspace is per thread).
  const int threads_per_rank = std::max(1, s.threads / s.ranks);
  const RankRun alone_per_rank = run_rank(s, rows_of(s, 0), nullptr, threads_per_rank);

  const double ring = 2.0 * (s.ranks - 1) / s.ranks;
  std::printf("\n%-6s %-5s %9s %9s %7s %12s %14s\n", "rank", "step", "step s", "comm s", "share",
              "payload MB", "ring MB/link");
  for (int r = 0; r < s.ranks; ++r) {
    for (size_t i = 0; i < gang[r].steps.size(); ++i) {
      const StepFigures& f = gang[r].steps[i];
      std::printf("%-6d %-5zu %9.3f %9.3f %6.1f%% %12.2f %14.2f\n", r, i + 1, f.step_seconds,
                  f.communication_seconds, 100.0 * f.communication_seconds / f.step_seconds,
                  f.communication_bytes / 1e6, ring * f.communication_bytes / 1e6);
    }
  }
  for (size_t i = 0; i < alone.steps.size(); ++i) {
    std::printf("alone  %-5zu %9.3f   (1 rank x %d threads, the whole global batch)\n", i + 1,
                alone.steps[i].step_seconds, s.threads);
  }

  std::printf("\npeak MiB by kind (1 rank on %d thread(s), as each rank)\n%-16s", threads_per_rank,
              "");
  for (size_t k = 0; k < lomo::kMemoryKindCount; ++k) {
    std::printf(" %10.10s",
                std::string(lomo::memory_kind_name(static_cast<lomo::MemoryKind>(k))).c_str());
  }
  std::printf(" %10s\n", "total");
  print_memory("1 rank", alone_per_rank.memory);
  for (int r = 0; r < s.ranks; ++r) {
    const lomo::MemoryReport& m = gang[r].memory;
    print_memory(("rank " + std::to_string(r)).c_str(), m);
    const uint64_t communication = m.peak(lomo::MemoryKind::kCommunication);
    std::printf("  rank %d peak = 1-rank peak + communication (%llu + %llu = %llu bytes): %s\n", r,
                static_cast<unsigned long long>(alone_per_rank.memory.peak_total_bytes),
                static_cast<unsigned long long>(communication),
                static_cast<unsigned long long>(m.peak_total_bytes),
                m.peak_total_bytes == alone_per_rank.memory.peak_total_bytes + communication
                    ? "exactly"
                    : "NO");
  }
  return 0;
}
