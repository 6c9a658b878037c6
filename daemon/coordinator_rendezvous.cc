#include "daemon/coordinator_rendezvous.h"

#include <algorithm>
#include <thread>

#include "common/grpc_channel.h"
#include "common/printable.h"

namespace lomo::daemon {
namespace {

using Clock = std::chrono::steady_clock;

// "key 'a'" or "keys 'a', 'b'", printable whatever their bytes (Gloo's keys are text).
std::string describe_keys(const std::vector<std::string>& keys) {
  std::string text = keys.size() == 1 ? "key " : "keys ";
  for (size_t i = 0; i < keys.size(); ++i) {
    text += (i == 0 ? "'" : ", '") + printable_excerpt(keys[i], 200) + "'";
  }
  return text;
}

// "PERMISSION_DENIED" and the like: the words of the gRPC status codes.
std::string code_name(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  const auto index = static_cast<size_t>(code);
  return index < std::size(kNames) ? kNames[index] : "code " + std::to_string(index);
}

}  // namespace

CoordinatorRendezvous::CoordinatorRendezvous(CoordinatorRendezvousOptions options)
    : options_(std::move(options)),
      stub_(lomo::v1::WorkerService::NewStub(make_channel(options_.coordinator))) {}

void CoordinatorRendezvous::fail(const std::string& what, const grpc::Status& status) const {
  throw RendezvousError("rendezvous of job " + options_.job_id + " attempt " +
                        std::to_string(options_.attempt) + " on the coordinator " +
                        options_.coordinator + ": " + what + " failed: gRPC status " +
                        code_name(status.error_code()) + " (" + status.error_message() + ")");
}

grpc::Status CoordinatorRendezvous::try_set(const std::string& key, const std::string& value) {
  lomo::v1::RendezvousSetRequest request;
  request.set_worker_id(options_.worker_id);
  request.set_job_id(options_.job_id);
  request.set_attempt(options_.attempt);
  request.set_key(key);
  request.set_value(value);
  lomo::v1::RendezvousSetResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + options_.rpc_deadline);
  return stub_->RendezvousSet(&context, request, &response);
}

void CoordinatorRendezvous::set(const std::string& key, const std::string& value) {
  const auto deadline = Clock::now() + options_.rpc_deadline;
  std::chrono::milliseconds pause = options_.first_poll;
  while (true) {
    const grpc::Status status = try_set(key, value);
    if (status.ok()) break;
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE || Clock::now() + pause > deadline) {
      fail("setting key '" + printable_excerpt(key, 200) + "'", status);
    }
    republish_pending_ = true;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, options_.last_poll);
  }
  published_[key] = value;
  last_published_ = Clock::now();
}

bool CoordinatorRendezvous::republish() {
  for (const auto& [key, value] : published_) {
    const grpc::Status status = try_set(key, value);
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE) return false;
    if (!status.ok()) fail("setting key '" + printable_excerpt(key, 200) + "' again", status);
  }
  republish_pending_ = false;
  last_published_ = Clock::now();
  return true;
}

std::vector<std::string> CoordinatorRendezvous::get(const std::vector<std::string>& keys,
                                                    std::chrono::milliseconds timeout) {
  lomo::v1::RendezvousGetRequest request;
  request.set_worker_id(options_.worker_id);
  request.set_job_id(options_.job_id);
  request.set_attempt(options_.attempt);
  for (const std::string& key : keys) request.add_keys(key);
  const auto deadline = Clock::now() + timeout;
  std::chrono::milliseconds pause = options_.first_poll;
  while (true) {
    lomo::v1::RendezvousGetResponse response;
    grpc::ClientContext context;
    const auto left = std::max(deadline - Clock::now(), Clock::duration::zero());
    context.set_deadline(std::chrono::system_clock::now() +
                         std::min<Clock::duration>(options_.rpc_deadline, left + pause));
    const bool due = republish_pending_ || (!published_.empty() && Clock::now() - last_published_ >=
                                                                       options_.republish_every);
    const bool reachable = !due || republish();
    const grpc::Status status =
        reachable ? stub_->RendezvousGet(&context, request, &response)
                  : grpc::Status(grpc::StatusCode::UNAVAILABLE, "setting this rank's keys again");
    const bool unavailable = status.error_code() == grpc::StatusCode::UNAVAILABLE;
    if (unavailable) republish_pending_ = true;
    if (!status.ok() && (!unavailable || Clock::now() + pause > deadline)) {
      fail("reading " + describe_keys(keys), status);
    }
    if (status.ok() && response.ready()) {
      if (response.values_size() != static_cast<int>(keys.size())) {
        throw RendezvousError("rendezvous of job " + options_.job_id + " on the coordinator " +
                              options_.coordinator + ": " + std::to_string(response.values_size()) +
                              " values for " + describe_keys(keys));
      }
      return {response.values().begin(), response.values().end()};
    }
    if (Clock::now() + pause > deadline) {
      throw RendezvousError("rendezvous of job " + options_.job_id + " attempt " +
                            std::to_string(options_.attempt) + " on the coordinator " +
                            options_.coordinator + ": " + describe_keys(keys) + " not set within " +
                            std::to_string(timeout.count()) + " ms (a peer rank has not arrived)");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, options_.last_poll);
  }
}

}  // namespace lomo::daemon
