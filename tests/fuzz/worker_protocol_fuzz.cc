// Fuzzes the coordinator's handling of the worker protocol (issue 12): each input is a sequence of
// WorkerMessage protos sent on one WorkerService.Connect stream of a real in-process gRPC server
// (WorkerServiceImpl over a real Coordinator and store, authentication on; the stream carries the
// fixture's worker token, whose worker ids are "fuzz-*"). So a Register as "fuzz-a" followed by
// an idle Heartbeat gets a real assignment (a job is kept queued), and what follows exercises
// status reports, events and checkpoint uploads against it.
//
// Input: frames of [2-byte little-endian length][serialized WorkerMessage]; a frame that does not
// parse is skipped. In a message, job_id "$JOB" is replaced by the job assigned on this stream
// and attempt -1 by its attempt, so seeds can speak about a job whose id is random. Findings: a
// crash or sanitizer report; the stream not ending within its deadline after the half-close; the
// server not answering another call afterwards. Returns 0 when the coordinator answered the
// stream with Registered, else -1 (seeds make no promise: a stream closed just before may still
// hold the worker id for a moment).
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <future>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/grpc_channel.h"
#include "lomo/v1/workers.grpc.pb.h"
#include "server/worker_session.h"
#include "tests/fuzz/coordinator_fuzz_fixture.h"

namespace {

using std::chrono::milliseconds;

struct Server {
  Server()
      : workers(*lomo::fuzz::coordinator_fixture().coordinator,
                lomo::fuzz::coordinator_fixture().executor,
                lomo::fuzz::coordinator_fixture().in_flight,
                lomo::fuzz::coordinator_fixture().auth) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&workers);
    server = builder.BuildAndStart();
    if (server == nullptr || port == 0) throw std::runtime_error("cannot start the gRPC server");
    lomo::ChannelSecurity security;
    security.token = lomo::fuzz::kWorkerToken;
    stub = lomo::v1::WorkerService::NewStub(
        lomo::make_channel("127.0.0.1:" + std::to_string(port), {}, &security));
  }
  lomo::server::WorkerServiceImpl workers;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<lomo::v1::WorkerService::Stub> stub;
};

Server& server() {
  static Server* made = new Server();  // never destroyed: see coordinator_fuzz_fixture.h
  return *made;
}

// Keeps one cpu job QUEUED, so that an idle fuzz worker is assigned one (no restarts: a job
// waiting out a restart's backoff would count as queued without being assignable).
void keep_a_job_queued() {
  auto& fixture = lomo::fuzz::coordinator_fixture();
  const auto counts = fixture.store->count_jobs_by_state();
  const auto queued = counts.find(lomo::v1::JOB_STATE_QUEUED);
  if (queued != counts.end() && queued->second > 0) return;
  lomo::v1::SubmitJobRequest request;
  const auto parsed = google::protobuf::util::JsonStringToMessage(
      R"({"spec": {"model": {"path": "/m"}, "data": {"train": ["a.txt"]},
                   "training": {"steps": 100, "checkpoint_every": 10},
                   "resources": {"max_restarts": 0}}})",
      &request);
  if (!parsed.ok()) throw std::runtime_error("the fuzz job does not parse");
  std::promise<grpc::Status> done;
  lomo::v1::SubmitJobResponse response;
  fixture.coordinator->submit_job(request, "fuzz-admin", &response,
                                  [&done](grpc::Status status) { done.set_value(status); });
  const grpc::Status status = done.get_future().get();
  if (!status.ok())
    throw std::runtime_error("cannot submit the fuzz job: " + status.error_message());
}

std::vector<lomo::v1::WorkerMessage> decode(const uint8_t* data, size_t size) {
  std::vector<lomo::v1::WorkerMessage> messages;
  size_t at = 0;
  while (at + 2 <= size && messages.size() < 64) {
    const size_t length = data[at] | (size_t{data[at + 1]} << 8);
    at += 2;
    const size_t take = std::min(length, size - at);
    lomo::v1::WorkerMessage message;
    if (message.ParseFromArray(data + at, static_cast<int>(take))) messages.push_back(message);
    at += take;
  }
  return messages;
}

// "$JOB" and attempt -1 become the job and attempt assigned on this stream.
void bind_to_assignment(lomo::v1::WorkerMessage& message, const lomo::v1::Assignment& assigned) {
  auto bind = [&](std::string* job_id, int64_t attempt, auto set_attempt) {
    if (*job_id == "$JOB") *job_id = assigned.job_id();
    if (attempt == -1) set_attempt(assigned.attempt());
  };
  if (message.has_heartbeat()) {
    auto* m = message.mutable_heartbeat();
    bind(m->mutable_job_id(), m->attempt(), [m](int64_t a) { m->set_attempt(a); });
  } else if (message.has_status()) {
    auto* m = message.mutable_status();
    bind(m->mutable_job_id(), m->attempt(), [m](int64_t a) { m->set_attempt(a); });
  } else if (message.has_events()) {
    auto* m = message.mutable_events();
    bind(m->mutable_job_id(), m->attempt(), [m](int64_t a) { m->set_attempt(a); });
  } else if (message.has_checkpoint_chunk()) {
    auto* m = message.mutable_checkpoint_chunk();
    bind(m->mutable_job_id(), m->attempt(), [m](int64_t a) { m->set_attempt(a); });
  }
}

// What the coordinator sent on the stream, read on a thread of its own.
class Inbox {
 public:
  void push(const lomo::v1::CoordinatorMessage& message) {
    std::lock_guard lock(mu_);
    if (message.has_registered()) registered_ = true;
    if (message.has_assignment()) assignment_ = message.assignment();
    changed_.notify_all();
  }
  void close() {
    std::lock_guard lock(mu_);
    closed_ = true;
    changed_.notify_all();
  }
  bool registered() {
    std::lock_guard lock(mu_);
    return registered_;
  }
  // Waits up to `timeout` for Registered (or the end of the stream); whether it came.
  bool wait_registered(milliseconds timeout) {
    std::unique_lock lock(mu_);
    changed_.wait_for(lock, timeout, [this] { return registered_ || closed_; });
    return registered_;
  }
  // The assignment, waiting up to `timeout` for one (or the end of the stream).
  lomo::v1::Assignment assignment(milliseconds timeout) {
    std::unique_lock lock(mu_);
    changed_.wait_for(lock, timeout, [this] { return assignment_.has_value() || closed_; });
    return assignment_.value_or(lomo::v1::Assignment());
  }

 private:
  std::mutex mu_;
  std::condition_variable changed_;
  bool registered_ = false;
  bool closed_ = false;
  std::optional<lomo::v1::Assignment> assignment_;
};

// The server still answers a unary call (any status but UNAVAILABLE / DEADLINE_EXCEEDED).
void check_still_serving() {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  lomo::v1::RendezvousGetRequest request;
  request.set_worker_id("fuzz-probe");
  request.set_job_id("job-probe");
  request.set_attempt(1);
  lomo::v1::RendezvousGetResponse response;
  const grpc::Status status = server().stub->RendezvousGet(&context, request, &response);
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE ||
      status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    throw std::runtime_error("the coordinator stopped answering: " + status.error_message());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  keep_a_job_queued();
  std::vector<lomo::v1::WorkerMessage> messages = decode(data, size);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  auto stream = server().stub->Connect(&context);
  Inbox inbox;
  std::thread reader([&] {
    lomo::v1::CoordinatorMessage message;
    while (stream->Read(&message)) inbox.push(message);
    inbox.close();
  });
  lomo::v1::Assignment assigned;
  for (lomo::v1::WorkerMessage& message : messages) {
    bind_to_assignment(message, assigned);
    if (!stream->Write(message)) break;  // the coordinator ended the stream
    // Let the answers that the following messages depend on arrive: Registered, and after an
    // idle heartbeat of a registered worker, the assignment of the queued job.
    if (message.has_register_()) inbox.wait_registered(milliseconds(2000));
    if (message.has_heartbeat() && message.heartbeat().job_id().empty() &&
        assigned.job_id().empty() && inbox.registered()) {
      assigned = inbox.assignment(milliseconds(2000));
    }
  }
  stream->WritesDone();
  reader.join();  // the coordinator ends the stream after the half-close, or the deadline does
  const grpc::Status status = stream->Finish();
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    throw std::runtime_error("the stream did not end within 20 s of the half-close");
  }
  check_still_serving();
  return inbox.registered() ? 0 : -1;
}
