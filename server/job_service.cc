#include "server/job_service.h"

#include <deque>
#include <memory>
#include <mutex>
#include <optional>

#include "jobspec/job_spec.h"
#include "server/stream_reactor.h"

namespace lomo::server {

namespace {

constexpr int kWatchBatch = 256;

class WatchReactor final : public StreamReactor<v1::WatchJobResponse>,
                           public std::enable_shared_from_this<WatchReactor> {
 public:
  WatchReactor(Coordinator& coordinator, Executor& executor, InFlight& in_flight,
               const v1::WatchJobRequest& request)
      : StreamReactor(executor, in_flight),
        coordinator_(coordinator),
        job_id_(request.job_id()),
        follow_(request.follow()),
        after_(request.after_sequence()) {}

  void start() {
    self_ = shared_from_this();
    if (follow_) {
      // Before the first read, so that no event stored after that read goes unnoticed.
      std::weak_ptr<WatchReactor> weak = self_;
      subscription_ = coordinator_.event_hub().subscribe(job_id_, [weak] {
        if (auto reactor = weak.lock()) reactor->request_pump();
      });
    }
    request_pump();
  }

  void OnDone() override {
    if (subscription_ != 0) coordinator_.event_hub().unsubscribe(subscription_);
    in_flight_.end();
    self_.reset();
  }

 private:
  std::shared_ptr<StreamReactor> self() override { return shared_from_this(); }

  void pump_once() override {
    if (busy()) return;
    if (pending_.empty()) {
      EventBatch batch;
      const grpc::Status status = coordinator_.read_events(job_id_, after_, kWatchBatch, &batch);
      if (!status.ok()) return finish(status);
      for (v1::JobEvent& event : batch.events) {
        after_ = event.sequence();
        v1::WatchJobResponse& response = pending_.emplace_back();
        *response.mutable_event() = std::move(event);
        *response.mutable_job() = batch.job.job;
      }
      if (pending_.empty()) {
        if (!follow_ || is_terminal(batch.job.job.state())) return finish(grpc::Status::OK);
        if (coordinator_.event_hub().closed()) {
          return finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                     "the coordinator is shutting down; watch again with "
                                     "after_sequence=" +
                                         std::to_string(after_)));
        }
        return;  // wait for the hub
      }
    }
    current_ = std::move(pending_.front());
    pending_.pop_front();
    write(&current_);
  }

  Coordinator& coordinator_;
  const std::string job_id_;
  const bool follow_;
  int64_t after_;
  uint64_t subscription_ = 0;
  std::deque<v1::WatchJobResponse> pending_;  // read, not yet written (pump only)
  v1::WatchJobResponse current_;              // being written
  std::shared_ptr<WatchReactor> self_;
};

}  // namespace

grpc::ServerUnaryReactor* JobServiceImpl::finish_now(const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = new CountedUnaryReactor(in_flight_);
  reactor->Finish(status);
  return reactor;
}

grpc::ServerUnaryReactor* JobServiceImpl::finish_on_executor(
    std::function<void(std::function<void(const grpc::Status&)>)> write) {
  grpc::ServerUnaryReactor* reactor = new CountedUnaryReactor(in_flight_);
  executor_.post([write = std::move(write), reactor] {
    write([reactor](const grpc::Status& status) { reactor->Finish(status); });
  });
  return reactor;
}

grpc::Status check_spec_size(const v1::SubmitJobRequest& request) {
  const size_t bytes = request.spec_text().size() + request.spec().ByteSizeLong();
  if (bytes <= kMaxSpecBytes) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      "spec: " + std::to_string(bytes) + " bytes, over the limit of " +
                          std::to_string(kMaxSpecBytes) + " bytes (" +
                          std::to_string(kMaxSpecBytes / 1024) + " KiB) for a job spec");
}

grpc::Status check_job_access(Coordinator& coordinator, const Principal& principal, Access access,
                              const std::string& job_id) {
  if (principal.role == Role::kAdmin) return grpc::Status::OK;
  if (principal.role == Role::kViewer && access == Access::kReadJob) return grpc::Status::OK;
  v1::GetJobRequest get;
  get.set_job_id(job_id);
  v1::GetJobResponse job;
  if (grpc::Status status = coordinator.get_job(get, &job); !status.ok()) return status;
  return check_job_owner(principal, access, job.job().owner(), job_id);
}

grpc::Status check_checkpoint_access(Coordinator& coordinator, const Principal& principal,
                                     const std::string& checkpoint_id) {
  if (principal.role == Role::kAdmin) return grpc::Status::OK;
  v1::CheckpointInfo info;
  std::filesystem::path directory;
  grpc::Status status = coordinator.find_checkpoint(checkpoint_id, &info, &directory);
  if (!status.ok()) return status;
  // The coordinator names checkpoints "<job id>/step-…"; the store just confirmed this one.
  return check_job_access(coordinator, principal, Access::kDownload,
                          checkpoint_id.substr(0, checkpoint_id.find('/')));
}

grpc::ServerUnaryReactor* JobServiceImpl::SubmitJob(grpc::CallbackServerContext* context,
                                                    const v1::SubmitJobRequest* request,
                                                    v1::SubmitJobResponse* response) {
  Principal caller;
  if (grpc::Status status =
          auth_.authorize_call(*context, "/lomo.v1.JobService/SubmitJob", &caller);
      !status.ok()) {
    return finish_now(status);
  }
  if (grpc::Status size = check_spec_size(*request); !size.ok()) return finish_now(size);
  return finish_on_executor([this, request, response, owner = caller.name](auto done) {
    coordinator_.submit_job(*request, owner, response, std::move(done));
  });
}

// Reads run on gRPC's thread: they use the store's reader connections, never wait for a writer,
// and would otherwise queue behind writes on the Executor.
grpc::ServerUnaryReactor* JobServiceImpl::GetJob(grpc::CallbackServerContext* context,
                                                 const v1::GetJobRequest* request,
                                                 v1::GetJobResponse* response) {
  Principal caller;
  grpc::Status status = auth_.authorize_call(*context, "/lomo.v1.JobService/GetJob", &caller);
  if (status.ok()) status = coordinator_.get_job(*request, response);
  if (status.ok()) {
    status = check_job_owner(caller, Access::kReadJob, response->job().owner(), request->job_id());
    if (!status.ok()) response->Clear();
  }
  return finish_now(status);
}

grpc::ServerUnaryReactor* JobServiceImpl::ListJobs(grpc::CallbackServerContext* context,
                                                   const v1::ListJobsRequest* request,
                                                   v1::ListJobsResponse* response) {
  Principal caller;
  grpc::Status status = auth_.authorize_call(*context, "/lomo.v1.JobService/ListJobs", &caller);
  if (!status.ok()) return finish_now(status);
  const bool own_jobs_only = caller.role == Role::kUser;
  return finish_now(
      coordinator_.list_jobs(*request, response, own_jobs_only ? &caller.name : nullptr));
}

grpc::ServerUnaryReactor* JobServiceImpl::CancelJob(grpc::CallbackServerContext* context,
                                                    const v1::CancelJobRequest* request,
                                                    v1::CancelJobResponse* response) {
  Principal caller;
  grpc::Status status = auth_.authorize_call(*context, "/lomo.v1.JobService/CancelJob", &caller);
  if (status.ok()) {
    status = check_job_access(coordinator_, caller, Access::kChangeJob, request->job_id());
  }
  if (!status.ok()) return finish_now(status);
  return finish_on_executor([this, request, response](auto done) {
    coordinator_.cancel_job(*request, response, std::move(done));
  });
}

grpc::ServerUnaryReactor* JobServiceImpl::ListCheckpoints(grpc::CallbackServerContext* context,
                                                          const v1::ListCheckpointsRequest* request,
                                                          v1::ListCheckpointsResponse* response) {
  Principal caller;
  grpc::Status status =
      auth_.authorize_call(*context, "/lomo.v1.JobService/ListCheckpoints", &caller);
  if (status.ok()) {
    status = check_job_access(coordinator_, caller, Access::kReadJob, request->job_id());
  }
  if (!status.ok()) return finish_now(status);
  return finish_now(coordinator_.list_checkpoints(*request, response));
}

grpc::ServerWriteReactor<v1::WatchJobResponse>* JobServiceImpl::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  Principal caller;
  grpc::Status status = auth_.authorize_call(*context, "/lomo.v1.JobService/WatchJob", &caller);
  if (status.ok()) {
    status = check_job_access(coordinator_, caller, Access::kReadJob, request->job_id());
  }
  if (!status.ok()) return refuse_stream<v1::WatchJobResponse>(in_flight_, status);
  auto reactor = std::make_shared<WatchReactor>(coordinator_, executor_, in_flight_, *request);
  reactor->start();
  return reactor.get();
}

grpc::ServerWriteReactor<v1::DownloadCheckpointResponse>* JobServiceImpl::DownloadCheckpoint(
    grpc::CallbackServerContext* context, const v1::DownloadCheckpointRequest* request) {
  using Reactor = CheckpointFilesReactor<v1::DownloadCheckpointResponse>;
  Principal caller;
  if (grpc::Status status =
          auth_.authorize_call(*context, "/lomo.v1.JobService/DownloadCheckpoint", &caller);
      !status.ok()) {
    return refuse_stream<v1::DownloadCheckpointResponse>(in_flight_, status);
  }
  const std::string& checkpoint_id = request->checkpoint_id();
  auto reactor = std::make_shared<Reactor>(
      executor_, in_flight_, "checkpoint " + checkpoint_id,
      [this, checkpoint_id, caller](std::optional<Reactor::Source>* source) {
        Reactor::Source found;
        grpc::Status status = check_checkpoint_access(coordinator_, caller, checkpoint_id);
        if (!status.ok()) return status;
        status = coordinator_.find_checkpoint(checkpoint_id, &found.info, &found.directory);
        if (status.ok()) *source = std::move(found);
        return status;
      },
      Reactor::Header(),
      [](v1::FileChunk chunk) {
        v1::DownloadCheckpointResponse response;
        *response.mutable_chunk() = std::move(chunk);
        return response;
      });
  reactor->start();
  return reactor.get();
}

}  // namespace lomo::server
