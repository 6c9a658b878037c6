// SIGINT and SIGTERM taken by one thread with sigwait instead of a signal handler, so that what a
// stop does (cancel a job, stop a child, flush reports) can be ordinary code.
#pragma once

#include <functional>
#include <thread>

namespace lomo {

class StopSignalWatcher {
 public:
  // Blocks SIGINT and SIGTERM (and SIGUSR1, used to end the watcher) in the calling thread;
  // construct it before any other thread starts so that every thread inherits the mask. Then
  // calls `on_signal(signal, count)` on the watcher's thread for each stop signal, `count`
  // numbering them from 1. Children started with ChildProcess get an empty mask back.
  explicit StopSignalWatcher(std::function<void(int signal, int count)> on_signal);
  // Ends the watcher thread (the signals stay blocked).
  ~StopSignalWatcher();
  StopSignalWatcher(const StopSignalWatcher&) = delete;
  StopSignalWatcher& operator=(const StopSignalWatcher&) = delete;

 private:
  std::thread thread_;
};

}  // namespace lomo
