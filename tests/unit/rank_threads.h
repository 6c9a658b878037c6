// One thread per rank for the communicator tests (the Gloo/in-process contract suite and the NCCL
// suite): a rank that hangs aborts the binary with a message instead of waiting for ctest's
// timeout, since a thread stuck in a collective cannot be cancelled.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lomo::comm_test {

inline std::chrono::milliseconds elapsed_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                               start);
}

// Runs body(rank) on one thread per rank and joins them. An exception a rank did not expect fails
// the test naming the rank. After `bound` (longer than any timeout the test uses) a rank still
// running has hung: the binary aborts.
inline void run_rank_threads(int world_size, std::chrono::seconds bound,
                             const std::function<void(int rank)>& body) {
  std::mutex mutex;
  std::condition_variable finished_changed;
  int finished = 0;
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (const std::exception& error) {
        ADD_FAILURE() << "rank " << r << " threw: " << error.what();
      }
      std::lock_guard lock(mutex);
      ++finished;
      finished_changed.notify_all();
    });
  }
  std::unique_lock lock(mutex);
  if (!finished_changed.wait_for(lock, bound, [&] { return finished == world_size; })) {
    std::fprintf(stderr, "%d of %d ranks still running after %lld s: a collective hung\n",
                 world_size - finished, world_size, static_cast<long long>(bound.count()));
    std::abort();
  }
  lock.unlock();
  for (auto& thread : threads) thread.join();
}

}  // namespace lomo::comm_test
