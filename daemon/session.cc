#include "daemon/session.h"

#include <algorithm>

#include "common/grpc_channel.h"
#include "common/log.h"
#include "daemon/backoff.h"

namespace lomo::daemon {
namespace {

using Clock = std::chrono::steady_clock;

std::string describe(const grpc::Status& status) {
  if (status.ok()) return "the coordinator closed the stream";
  return "gRPC " + std::to_string(static_cast<int>(status.error_code())) + ": " +
         status.error_message();
}

std::string seconds_text(std::chrono::milliseconds d) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1fs", static_cast<double>(d.count()) / 1000.0);
  return text;
}

// A fresh channel per dial with its own subchannel pool, retrying a refused connection every
// quarter to one second within the dial's deadline: gRPC's own reconnect backoff (up to two
// minutes by default) never delays a dial that our backoff has scheduled, and a coordinator that
// comes back is found within about a second.
std::shared_ptr<grpc::Channel> dial_channel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 250);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 250);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 64 << 20);
  return lomo::make_channel(address, args);
}

}  // namespace

Session::Session(SessionOptions options, SessionHandler& handler, Outbox& outbox)
    : options_(std::move(options)),
      handler_(handler),
      outbox_(outbox),
      worker_id_(options_.registration.worker_id()) {}

Session::~Session() { stop(); }

void Session::start() {
  thread_ = std::thread([this] { run(); });
}

void Session::log(const std::string& line) const { log_line(line); }

std::string Session::worker_id() const {
  std::lock_guard lock(mutex_);
  return worker_id_;
}

uint64_t Session::wait_connected(Clock::time_point until) const {
  std::unique_lock lock(mutex_);
  changed_.wait_until(lock, until, [&] { return generation_.load() != 0 || stopping_; });
  return generation_.load();
}

bool Session::finished_locked() const {
  return stopping_ || (half_closing_ && outbox_.reliable_pending() == 0);
}

void Session::run() {
  Backoff backoff(options_.initial_backoff, options_.max_backoff);
  while (true) {
    Clock::time_point registered_at{};
    const bool registered = run_connection(&registered_at);
    std::unique_lock lock(mutex_);
    if (finished_locked()) break;
    if (registered && Clock::now() - registered_at >= options_.stable_after) backoff.reset();
    const auto delay = backoff.next();
    lock.unlock();
    log("reconnecting to " + options_.address + " in " + seconds_text(delay));
    lock.lock();
    changed_.wait_for(lock, delay, [&] { return finished_locked(); });
    if (finished_locked()) break;
  }
  std::lock_guard lock(mutex_);
  stopping_ = true;
  changed_.notify_all();
}

bool Session::wait_for_channel(grpc::Channel& channel, Clock::time_point deadline) {
  // gRPC takes system_clock deadlines; short waits keep stop() responsive.
  auto soon = [] { return std::chrono::system_clock::now() + std::chrono::milliseconds(200); };
  while (!channel.WaitForConnected(soon())) {
    {
      std::lock_guard lock(mutex_);
      if (finished_locked()) return false;
    }
    if (Clock::now() >= deadline) {
      log("cannot reach the coordinator at " + options_.address + " (no connection within " +
          seconds_text(options_.connect_timeout) + ")");
      return false;
    }
  }
  return true;
}

bool Session::register_on(Stream& stream, grpc::ClientContext& context, Clock::time_point deadline,
                          lomo::v1::CoordinatorMessage* first) {
  lomo::v1::WorkerMessage hello;
  *hello.mutable_register_() = options_.registration;
  {
    std::lock_guard lock(mutex_);
    hello.mutable_register_()->set_worker_id(worker_id_);  // keep the id a coordinator gave us
  }
  // The Registered reply must come before the deadline: a watchdog cancels the stream otherwise.
  bool answered = false;
  std::thread watchdog([&] {
    std::unique_lock lock(mutex_);
    if (!changed_.wait_until(lock, deadline, [&] { return answered || stopping_; }) || stopping_) {
      context.TryCancel();
    }
  });
  const bool ok = stream.Write(hello) && stream.Read(first);
  {
    std::lock_guard lock(mutex_);
    answered = true;
  }
  changed_.notify_all();
  watchdog.join();
  if (ok && first->has_registered()) return true;
  if (ok) context.TryCancel();
  const grpc::Status status = stream.Finish();
  log("registration with " + options_.address +
      " failed: " + (ok ? std::string("the first reply was not Registered") : describe(status)));
  return false;
}

void Session::serve_connection(Stream& stream, grpc::ClientContext& context,
                               const lomo::v1::Registered& registered,
                               Clock::time_point* registered_at) {
  const auto interval = registered.heartbeat_interval_ms() > 0
                            ? std::chrono::milliseconds(registered.heartbeat_interval_ms())
                            : options_.default_heartbeat_interval;
  uint64_t generation;
  {
    std::lock_guard lock(mutex_);
    if (!registered.worker_id().empty()) worker_id_ = registered.worker_id();
    generation = next_generation_++;
    outbox_.open_connection(generation);
    generation_ = generation;
  }
  changed_.notify_all();
  *registered_at = Clock::now();
  log("registered with " + options_.address + " as " + worker_id() + " (heartbeat every " +
      seconds_text(interval) + ")");
  handler_.on_registered(registered, generation);

  std::thread writer([&] { write_loop(&stream, &context, generation, interval); });
  lomo::v1::CoordinatorMessage message;
  while (stream.Read(&message)) handler_.on_message(message);

  {
    std::lock_guard lock(mutex_);
    generation_ = 0;
  }
  changed_.notify_all();
  outbox_.close_connection();
  context.TryCancel();  // unblocks a Write stuck on flow control
  writer.join();
  const grpc::Status status = stream.Finish();
  bool quiet;
  {
    std::lock_guard lock(mutex_);
    quiet = stopping_ || half_closing_;
  }
  if (!quiet) log("disconnected from " + options_.address + ": " + describe(status));
  handler_.on_disconnected(generation, describe(status));
}

bool Session::run_connection(Clock::time_point* registered_at) {
  const auto deadline = Clock::now() + options_.connect_timeout;
  auto channel = dial_channel(options_.address);
  if (!wait_for_channel(*channel, deadline)) return false;
  auto stub = lomo::v1::WorkerService::NewStub(channel);
  grpc::ClientContext context;
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return false;
    context_ = &context;
  }
  auto forget_context = [&] {
    std::lock_guard lock(mutex_);
    context_ = nullptr;
  };
  std::unique_ptr<Stream> stream = stub->Connect(&context);
  lomo::v1::CoordinatorMessage first;
  if (!register_on(*stream, context, deadline, &first)) {
    forget_context();
    return false;
  }
  serve_connection(*stream, context, first.registered(), registered_at);
  forget_context();
  return true;
}

void Session::write_loop(Stream* stream, grpc::ClientContext* context, uint64_t generation,
                         std::chrono::milliseconds heartbeat_interval) {
  auto next_heartbeat = Clock::now();
  while (true) {
    bool half_close;
    {
      std::lock_guard lock(mutex_);
      half_close = half_closing_;
    }
    if (half_close && outbox_.reliable_pending() == 0) {
      stream->WritesDone();  // the coordinator ends the stream once it has read everything
      return;
    }
    const auto until = std::min(next_heartbeat, Clock::now() + std::chrono::milliseconds(200));
    std::optional<Outbox::Item> item = outbox_.pop(generation, until);
    if (item) {
      const bool written = stream->Write(item->message);
      outbox_.finish(std::move(*item), written);
      if (!written) {
        context->TryCancel();
        return;
      }
      continue;
    }
    if (generation_.load() != generation) return;
    if (Clock::now() >= next_heartbeat) {
      lomo::v1::WorkerMessage beat;
      *beat.mutable_heartbeat() = handler_.heartbeat();
      if (!stream->Write(beat)) {
        context->TryCancel();
        return;
      }
      next_heartbeat = Clock::now() + heartbeat_interval;
    }
  }
}

bool Session::shutdown(Clock::time_point deadline) {
  {
    std::lock_guard lock(mutex_);
    half_closing_ = true;
  }
  changed_.notify_all();
  bool finished;
  {
    std::unique_lock lock(mutex_);
    finished = changed_.wait_until(lock, deadline, [&] { return stopping_; });
  }
  if (!finished) log("the coordinator did not take the last reports in time; stopping anyway");
  stop();
  return outbox_.reliable_pending() == 0;
}

void Session::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    if (context_ != nullptr) context_->TryCancel();
  }
  changed_.notify_all();
  outbox_.close_connection();
  if (thread_.joinable()) thread_.join();
}

}  // namespace lomo::daemon
