// Counts the RPCs in progress, so that shutdown can wait for exactly them. gRPC's own
// Server::Shutdown(deadline) also waits for client connections to close, which an idle client
// channel may never do before the deadline.
#pragma once

#include <grpcpp/support/server_callback.h>

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace lomo::server {

class InFlight {
 public:
  void begin() {
    std::lock_guard lock(mu_);
    ++count_;
  }
  void end() {
    std::lock_guard lock(mu_);
    if (--count_ == 0) idle_.notify_all();
  }
  // True once no RPC is in progress; false if `until` came first.
  bool wait_idle(std::chrono::steady_clock::time_point until) {
    std::unique_lock lock(mu_);
    return idle_.wait_until(lock, until, [this] { return count_ == 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable idle_;
  long count_ = 0;
};

// A unary call's reactor, counted in InFlight until gRPC is done with it (its status sent).
class CountedUnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  explicit CountedUnaryReactor(InFlight& in_flight) : in_flight_(in_flight) { in_flight_.begin(); }
  void OnDone() override {
    in_flight_.end();
    delete this;
  }

 private:
  InFlight& in_flight_;
};

}  // namespace lomo::server
