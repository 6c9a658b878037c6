// A small typed client of the coordinator's public API (lomo.v1.JobService), used by lomoctl and
// tests (the worker daemon fetches checkpoints over the worker protocol instead, without user
// credentials). Every unary call carries a deadline;
// failures are thrown as ClientError with the gRPC status and a message fit for a terminal.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/grpc_channel.h"
#include "lomo/v1/jobs.grpc.pb.h"

namespace lomo::client {

class ClientError : public std::runtime_error {
 public:
  ClientError(grpc::StatusCode code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  grpc::StatusCode code() const { return code_; }
  // The coordinator could not be reached at all (as opposed to answering with an error).
  bool unreachable() const { return code_ == grpc::StatusCode::UNAVAILABLE; }

 private:
  grpc::StatusCode code_;
};

// The message lomoctl prints for a failed call to `address`: unreachable coordinators are named
// with the hint to start one or point at another; answers keep the coordinator's own words (a
// rejected spec names the field).
std::string describe_status(const grpc::Status& status, const std::string& address);

struct ClientOptions {
  std::string address = "127.0.0.1:7070";
  std::chrono::milliseconds timeout{10000};  // deadline of each unary call
  std::chrono::hours download_timeout{6};    // deadline of a whole checkpoint download
  ChannelSecurity security;                  // bearer token, CA bundle (common/grpc_channel.h)
};

struct DownloadProgress {
  std::string path;   // the file being written
  int64_t bytes = 0;  // received so far, all files
};

struct DownloadResult {
  std::vector<lomo::v1::CheckpointFile> files;  // as received and verified
  int64_t bytes = 0;
};

class Client {
 public:
  explicit Client(ClientOptions options);

  const std::string& address() const { return options_.address; }

  lomo::v1::Job submit_job(const google::protobuf::Struct& spec);
  // The spec as text (spec_text) with its overrides: the exact form (jobspec/proto/spec_proto.h).
  lomo::v1::Job submit_job(const lomo::v1::SubmitJobRequest& request);
  lomo::v1::Job get_job(const std::string& job_id);
  // Newest first; `limit` 0: all of them (following page tokens).
  std::vector<lomo::v1::Job> list_jobs(const std::vector<lomo::v1::JobState>& states, int limit);
  lomo::v1::Job cancel_job(const std::string& job_id);
  std::vector<lomo::v1::CheckpointInfo> list_checkpoints(const std::string& job_id);

  // Streams the job's events with sequence > `after_sequence` to `on_event` until it returns
  // false, the stream ends (follow: when the job has ended), or cancel_streams(). No deadline:
  // a followed job may run for days. Throws ClientError when the stream fails.
  void watch_job(const std::string& job_id, int64_t after_sequence, bool follow,
                 const std::function<bool(const lomo::v1::WatchJobResponse&)>& on_event);

  // Downloads a checkpoint into `directory` (absent or empty; anything else throws ClientError
  // FAILED_PRECONDITION) with common/file_transfer.h's FileReceiver: each file is checked against
  // the SHA-256 the coordinator sends with its last chunk, and the whole checkpoint against its
  // lomo_manifest.json when it has one. Files land in a temporary directory beside `directory`
  // that is renamed to it only when all of them are complete and verified, and removed on any
  // failure: `directory` holds the whole checkpoint or is left as it was. A mismatch, a gap, or a
  // path that would leave the directory throws ClientError DATA_LOSS.
  // `expected`, when not empty, must match the files received (names, sizes, checksums).
  DownloadResult download_checkpoint(
      const std::string& checkpoint_id, const std::filesystem::path& directory,
      const std::vector<lomo::v1::CheckpointFile>& expected = {},
      const std::function<void(const DownloadProgress&)>& progress = {});

  // True once the coordinator accepts connections, polling until `timeout`.
  bool wait_until_reachable(std::chrono::milliseconds timeout);

  // Cancels the streams in progress (watch, download) from any thread: they throw ClientError
  // CANCELLED, and so does every stream started afterwards.
  void cancel_streams();
  // cancel_streams() was called (a CANCELLED stream is then ours, not the coordinator's doing).
  bool streams_cancelled();

 private:
  std::unique_ptr<grpc::ClientContext> unary_context() const;
  [[noreturn]] void fail(const grpc::Status& status) const;
  void track(grpc::ClientContext* context);
  void untrack(grpc::ClientContext* context);

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<lomo::v1::JobService::Stub> stub_;
  std::mutex mutex_;
  std::set<grpc::ClientContext*> streams_;
  bool cancelled_ = false;
};

}  // namespace lomo::client
