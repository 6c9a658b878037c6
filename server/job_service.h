// JobService on gRPC's callback API. SubmitJob and CancelJob run on the Executor (they take the
// coordinator's lock and write) and finish once their change is durable; the other unary calls
// read on gRPC's thread. WatchJob streams the stored events after after_sequence,
// then, with follow, each new event as it is stored, until the job has ended and every event is
// sent. DownloadCheckpoint streams each file of a committed checkpoint as FileChunks
// (common/file_transfer.h), with the file's SHA-256 (checked against the recorded one as it is
// read) on its last chunk.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>

#include "lomo/v1/jobs.grpc.pb.h"
#include "server/auth.h"
#include "server/coordinator.h"
#include "server/executor.h"
#include "server/in_flight.h"

namespace lomo::server {

// INVALID_ARGUMENT naming the limit when the request's spec (spec_text or the Struct) is larger
// than kMaxSpecBytes (jobspec/job_spec.h); checked by gRPC and REST before anything else.
grpc::Status check_spec_size(const v1::SubmitJobRequest& request);

// The owner part of `access` to job `job_id` (NOT_FOUND for no such job). Admins, and viewers
// reading, need no look-up.
grpc::Status check_job_access(Coordinator& coordinator, const Principal& principal, Access access,
                              const std::string& job_id);
// The same for the job a checkpoint belongs to.
grpc::Status check_checkpoint_access(Coordinator& coordinator, const Principal& principal,
                                     const std::string& checkpoint_id);

class JobServiceImpl final : public v1::JobService::CallbackService {
 public:
  // Every call is counted in `in_flight` from its start to its end; `auth` decides who may call
  // what (server/auth.h).
  JobServiceImpl(Coordinator& coordinator, Executor& executor, InFlight& in_flight,
                 const Authenticator& auth)
      : coordinator_(coordinator), executor_(executor), in_flight_(in_flight), auth_(auth) {}

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const v1::SubmitJobRequest* request,
                                      v1::SubmitJobResponse* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const v1::GetJobRequest* request,
                                   v1::GetJobResponse* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const v1::ListJobsRequest* request,
                                     v1::ListJobsResponse* response) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const v1::CancelJobRequest* request,
                                      v1::CancelJobResponse* response) override;
  grpc::ServerUnaryReactor* ListCheckpoints(grpc::CallbackServerContext* context,
                                            const v1::ListCheckpointsRequest* request,
                                            v1::ListCheckpointsResponse* response) override;
  grpc::ServerWriteReactor<v1::WatchJobResponse>* WatchJob(
      grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) override;
  grpc::ServerWriteReactor<v1::DownloadCheckpointResponse>* DownloadCheckpoint(
      grpc::CallbackServerContext* context, const v1::DownloadCheckpointRequest* request) override;

 private:
  // Unary answers: reads finish at once on gRPC's thread; writes run on the executor and finish
  // when the coordinator calls back.
  grpc::ServerUnaryReactor* finish_now(const grpc::Status& status);
  grpc::ServerUnaryReactor* finish_on_executor(
      std::function<void(std::function<void(const grpc::Status&)>)> write);

  Coordinator& coordinator_;
  Executor& executor_;
  InFlight& in_flight_;
  const Authenticator& auth_;
};

}  // namespace lomo::server
