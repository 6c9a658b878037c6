#include "server/worker_session.h"

#include <optional>
#include <utility>

#include "server/stream_reactor.h"

namespace lomo::server {

namespace {

int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

// PERMISSION_DENIED unless `caller` may use `worker_id` (its token's worker_ids).
grpc::Status check_worker_id(const Principal& caller, const std::string& worker_id) {
  if (caller.may_use_worker_id(worker_id)) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                      caller.describe() + " may not act as worker \"" + worker_id.substr(0, 200) +
                          "\" (not among its worker_ids in the tokens file; start the worker with "
                          "--worker-id set to one of them)");
}

WorkerSession::WorkerSession(uint64_t id, Coordinator& coordinator, Executor& executor,
                             InFlight& in_flight, Principal caller, bool check_worker_id)
    : id_(id),
      caller_(std::move(caller)),
      check_worker_id_(check_worker_id),
      coordinator_(coordinator),
      executor_(executor),
      in_flight_(in_flight),
      last_heartbeat_ns_(steady_now_ns()) {
  in_flight_.begin();
}

void WorkerSession::start() {
  self_ = shared_from_this();
  std::lock_guard lock(mu_);
  StartRead(&incoming_);
}

std::chrono::steady_clock::time_point WorkerSession::last_heartbeat() const {
  return std::chrono::steady_clock::time_point(
      std::chrono::nanoseconds(last_heartbeat_ns_.load(std::memory_order_relaxed)));
}

void WorkerSession::touch() {
  last_heartbeat_ns_.store(steady_now_ns(), std::memory_order_relaxed);
}

bool WorkerSession::send(const v1::CoordinatorMessage& message) {
  std::lock_guard lock(mu_);
  if (closing_ || finished_) return false;
  outgoing_.push_back(message);
  if (!writing_) {
    writing_ = true;
    StartWrite(&outgoing_.front());
  }
  return true;
}

void WorkerSession::close(const grpc::Status& status) {
  std::lock_guard lock(mu_);
  if (closing_ || finished_) return;
  closing_ = true;
  finish_status_ = status;
  if (!writing_) {
    finished_ = true;
    Finish(status);
  }
}

void WorkerSession::OnWriteDone(bool ok) {
  std::lock_guard lock(mu_);
  outgoing_.pop_front();
  writing_ = false;
  if (!ok) {
    // The stream is broken; OnDone follows once it is finished.
    outgoing_.clear();
    closing_ = true;
    if (!finished_) {
      finished_ = true;
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "write to the worker failed"));
    }
    return;
  }
  if (!outgoing_.empty() && !finished_) {
    writing_ = true;
    StartWrite(&outgoing_.front());
  } else if (closing_ && !finished_) {
    finished_ = true;
    Finish(finish_status_);
  }
}

void WorkerSession::OnReadDone(bool ok) {
  if (!ok) {
    // The worker closed its side, or the connection broke.
    close(grpc::Status::OK);
    return;
  }
  if (registered_ && incoming_.has_heartbeat()) {
    touch();
    const v1::Heartbeat& heartbeat = incoming_.heartbeat();
    if (heartbeat_seen_ && heartbeat.job_id() == heartbeat_job_ &&
        heartbeat.attempt() == heartbeat_attempt_) {
      read_next();  // the common case: nothing changed, nothing to write down
      return;
    }
  }
  executor_.post(
      [self = shared_from_this(), message = std::move(incoming_)] { self->handle(message); });
}

void WorkerSession::handle(const v1::WorkerMessage& message) {
  {
    std::lock_guard lock(mu_);
    if (finished_ || done_) return;
  }
  const std::shared_ptr<WorkerSession> self = shared_from_this();
  if (!registered_) {
    if (!message.has_register_()) {
      close(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                         "the first message on a worker stream must be Register"));
      return;
    }
    touch();
    if (check_worker_id_) {
      if (grpc::Status denied = check_worker_id(caller_, message.register_().worker_id());
          !denied.ok()) {
        close(denied);
        return;
      }
    }
    const grpc::Status status = coordinator_.on_register(self, message.register_());
    if (!status.ok()) {
      close(status);
      return;
    }
    registered_ = true;
  } else {
    switch (message.kind_case()) {
      case v1::WorkerMessage::kRegister:
        close(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                           "Register comes once, as the first message of the stream"));
        return;
      case v1::WorkerMessage::kHeartbeat:
        heartbeat_seen_ = true;
        heartbeat_job_ = message.heartbeat().job_id();
        heartbeat_attempt_ = message.heartbeat().attempt();
        coordinator_.on_heartbeat(self, message.heartbeat());
        break;
      case v1::WorkerMessage::kStatus:
        coordinator_.on_status(self, message.status());
        break;
      case v1::WorkerMessage::kEvents:
        coordinator_.on_events(self, message.events());
        break;
      case v1::WorkerMessage::kCheckpointChunk:
        coordinator_.on_checkpoint_chunk(self, message.checkpoint_chunk());
        break;
      case v1::WorkerMessage::KIND_NOT_SET:
        break;  // a newer worker's message kind: nothing to do with it
    }
  }
  read_next();
}

void WorkerSession::read_next() {
  std::lock_guard lock(mu_);
  if (!finished_) StartRead(&incoming_);
}

void WorkerSession::OnCancel() {
  close(grpc::Status(grpc::StatusCode::CANCELLED, "the worker stream was cancelled"));
}

void WorkerSession::OnDone() {
  {
    std::lock_guard lock(mu_);
    done_ = true;
  }
  coordinator_.on_disconnect(shared_from_this());
  in_flight_.end();
  self_.reset();  // may destroy this; nothing may follow
}

grpc::Status WorkerServiceImpl::authorize(const grpc::CallbackServerContext& context,
                                          const std::string& method,
                                          const std::string& worker_id) const {
  Principal caller;
  grpc::Status status = auth_.authorize_call(context, method, &caller);
  if (status.ok() && auth_.enabled()) status = check_worker_id(caller, worker_id);
  return status;
}

grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>* WorkerServiceImpl::Connect(
    grpc::CallbackServerContext* context) {
  using Bidi = grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>;
  Principal caller;
  if (grpc::Status status =
          auth_.authorize_call(*context, "/lomo.v1.WorkerService/Connect", &caller);
      !status.ok()) {
    return new RefusedReactor<Bidi>(in_flight_, status);
  }
  auto session = std::make_shared<WorkerSession>(next_connection_id_++, coordinator_, executor_,
                                                 in_flight_, std::move(caller), auth_.enabled());
  session->start();
  return session.get();
}

grpc::ServerWriteReactor<v1::FetchCheckpointResponse>* WorkerServiceImpl::FetchCheckpoint(
    grpc::CallbackServerContext* context, const v1::FetchCheckpointRequest* request) {
  using Reactor = CheckpointFilesReactor<v1::FetchCheckpointResponse>;
  if (grpc::Status status =
          authorize(*context, "/lomo.v1.WorkerService/FetchCheckpoint", request->worker_id());
      !status.ok()) {
    return refuse_stream<v1::FetchCheckpointResponse>(in_flight_, status);
  }
  const v1::FetchCheckpointRequest fetch = *request;
  auto reactor = std::make_shared<Reactor>(
      executor_, in_flight_, "the newest checkpoint of job " + fetch.job_id(),
      [this, fetch](std::optional<Reactor::Source>* source) {
        Reactor::Source found;
        bool exists = false;
        grpc::Status status =
            coordinator_.find_checkpoint_to_resume(fetch, &found.info, &found.directory, &exists);
        if (status.ok() && exists) *source = std::move(found);
        return status;
      },
      [](const v1::CheckpointInfo& info) {
        v1::FetchCheckpointResponse first;
        *first.mutable_checkpoint() = info;
        return std::optional<v1::FetchCheckpointResponse>(std::move(first));
      },
      [](v1::FileChunk chunk) {
        v1::FetchCheckpointResponse response;
        *response.mutable_chunk() = std::move(chunk);
        return response;
      });
  reactor->start();
  return reactor.get();
}

grpc::ServerUnaryReactor* WorkerServiceImpl::RendezvousSet(
    grpc::CallbackServerContext* context, const v1::RendezvousSetRequest* request,
    v1::RendezvousSetResponse* /*response*/) {
  grpc::ServerUnaryReactor* reactor = new CountedUnaryReactor(in_flight_);
  if (grpc::Status status =
          authorize(*context, "/lomo.v1.WorkerService/RendezvousSet", request->worker_id());
      !status.ok()) {
    reactor->Finish(status);
    return reactor;
  }
  executor_.post(
      [this, request, reactor] { reactor->Finish(coordinator_.rendezvous_set(*request)); });
  return reactor;
}

grpc::ServerUnaryReactor* WorkerServiceImpl::RendezvousGet(grpc::CallbackServerContext* context,
                                                           const v1::RendezvousGetRequest* request,
                                                           v1::RendezvousGetResponse* response) {
  grpc::ServerUnaryReactor* reactor = new CountedUnaryReactor(in_flight_);
  if (grpc::Status status =
          authorize(*context, "/lomo.v1.WorkerService/RendezvousGet", request->worker_id());
      !status.ok()) {
    reactor->Finish(status);
    return reactor;
  }
  executor_.post([this, request, response, reactor] {
    reactor->Finish(coordinator_.rendezvous_get(*request, response));
  });
  return reactor;
}

}  // namespace lomo::server
