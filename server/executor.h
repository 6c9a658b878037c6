// A fixed pool of threads for blocking work (SQLite transactions, checkpoint files), so that
// gRPC's callback threads never wait on a disk.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lomo::server {

class Executor {
 public:
  explicit Executor(int threads);
  ~Executor();  // shutdown()
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues `task`; tasks run in submission order on whichever thread is free. After shutdown()
  // began, tasks still run (on the caller's thread) so that an RPC is never left unfinished.
  void post(std::function<void()> task);
  // Runs every queued task, then joins the threads. Idempotent.
  void shutdown();

 private:
  void run();

  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace lomo::server
