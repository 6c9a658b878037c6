// All-reduce bus bandwidth of GlooCommunicator over loopback, 2 ranks on threads of this process
// (each rank its own communicator, TCP sockets through 127.0.0.1), f32 mean, 1 KiB to 256 MiB,
// against a memcpy bound of the same size measured here. Prints a table; asserts nothing.
//
// Bus bandwidth (NCCL's convention): bytes / time · 2(n−1)/n, the bytes each rank's link carries
// in a ring all-reduce; comparable across world sizes and to the memcpy bound.
//
//   allreduce_bench [--max-mib M]
#include <gloo/rendezvous/hash_store.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "worker/comm/gloo_communicator.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kWorld = 2;

// Enough repetitions for ~64 MiB moved per size (at least 3): small sizes measure latency, large
// ones bandwidth, without the run taking minutes.
int iterations_for(size_t bytes) {
  return static_cast<int>(std::clamp<size_t>((size_t{64} << 20) / bytes, 3, 2000));
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Best of three timed memcpy passes (the first touches the pages).
double memcpy_gbps(size_t bytes) {
  std::vector<char> source(bytes, 1), destination(bytes, 0);
  double best = 1e30;
  const int passes = std::max(3, iterations_for(bytes));
  for (int round = 0; round < 3; ++round) {
    const auto start = Clock::now();
    for (int i = 0; i < passes; ++i) {
      std::memcpy(destination.data(), source.data(), bytes);
      source[static_cast<size_t>(i) % bytes] ^= destination[bytes - 1];  // keep the copy alive
    }
    best = std::min(best, seconds_since(start) / passes);
  }
  return static_cast<double>(bytes) / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  size_t max_bytes = size_t{256} << 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::string(argv[i]) == "--max-mib") max_bytes = std::stoul(argv[i + 1]) << 20;
  }
  gloo::rendezvous::HashStore store;
  std::vector<std::unique_ptr<lomo::GlooCommunicator>> world(kWorld);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kWorld; ++rank) {
    threads.emplace_back([&, rank] {
      lomo::GlooCommunicatorOptions options;
      options.rank = rank;
      options.world_size = kWorld;
      options.prefix = "bench/allreduce";
      options.timeout = std::chrono::minutes(5);
      world[rank] = std::make_unique<lomo::GlooCommunicator>(options, store);
    });
  }
  for (auto& thread : threads) thread.join();

  std::printf("all_reduce f32 mean, %d ranks (threads, TCP over 127.0.0.1)\n", kWorld);
  std::printf("%10s %6s %12s %12s %12s %10s\n", "size", "iters", "time/op us", "busbw GB/s",
              "memcpy GB/s", "bus/memcpy");
  for (size_t bytes = 1024; bytes <= max_bytes; bytes *= 4) {
    const int iterations = iterations_for(bytes);
    const int64_t count = static_cast<int64_t>(bytes / sizeof(float));
    double elapsed = 0;
    threads.clear();
    for (int rank = 0; rank < kWorld; ++rank) {
      threads.emplace_back([&, rank] {
        std::vector<float> data(static_cast<size_t>(count), 1.0f + rank);
        lomo::GlooCommunicator& comm = *world[rank];
        comm.all_reduce(data.data(), count, lomo::ReduceOp::kMean);  // warm-up: scratch, pages
        comm.barrier();
        const auto start = Clock::now();
        for (int i = 0; i < iterations; ++i) {
          comm.all_reduce(data.data(), count, lomo::ReduceOp::kMean);
        }
        if (rank == 0) elapsed = seconds_since(start) / iterations;
      });
    }
    for (auto& thread : threads) thread.join();
    const double bus = static_cast<double>(bytes) / elapsed * 2.0 * (kWorld - 1) / kWorld / 1e9;
    const double copy = memcpy_gbps(bytes);
    const std::string size = bytes >= (size_t{1} << 20) ? std::to_string(bytes >> 20) + " MiB"
                                                        : std::to_string(bytes >> 10) + " KiB";
    std::printf("%10s %6d %12.1f %12.3f %12.2f %10.3f\n", size.c_str(), iterations, elapsed * 1e6,
                bus, copy, bus / copy);
    std::fflush(stdout);
  }
  return 0;
}
