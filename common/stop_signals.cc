#include "common/stop_signals.h"

#include <pthread.h>
#include <signal.h>

namespace lomo {

StopSignalWatcher::StopSignalWatcher(std::function<void(int signal, int count)> on_signal) {
  sigset_t watched;
  sigemptyset(&watched);
  sigaddset(&watched, SIGINT);
  sigaddset(&watched, SIGTERM);
  sigaddset(&watched, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &watched, nullptr);
  thread_ = std::thread([watched, on_signal = std::move(on_signal)] {
    int count = 0;
    while (true) {
      int signal = 0;
      if (sigwait(&watched, &signal) != 0) continue;
      if (signal == SIGUSR1) return;
      on_signal(signal, ++count);
    }
  });
}

StopSignalWatcher::~StopSignalWatcher() {
  pthread_kill(thread_.native_handle(), SIGUSR1);
  thread_.join();
}

}  // namespace lomo
