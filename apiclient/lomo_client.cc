#include "apiclient/lomo_client.h"

#include <stdlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>
#include <thread>

#include "common/checkpoint_manifest.h"
#include "common/file_transfer.h"

namespace lomo::client {
namespace {

namespace fs = std::filesystem;

// The download's destination as one name: "out/ckpt/" and "out/ckpt" are the same directory.
fs::path destination_path(const fs::path& directory) {
  fs::path path = directory.lexically_normal();
  if (!path.has_filename() && path.has_parent_path()) path = path.parent_path();
  return path;
}

// ".<name>.download-XXXXXX" beside the destination (same file system, so the rename is atomic),
// removed by the destructor unless commit_to() renamed it into place.
class TemporaryDirectory {
 public:
  explicit TemporaryDirectory(const fs::path& destination) {
    const fs::path parent =
        destination.has_parent_path() ? destination.parent_path() : fs::path(".");
    fs::create_directories(parent);
    std::string pattern =
        (parent / ("." + destination.filename().string() + ".download-XXXXXX")).string();
    if (::mkdtemp(pattern.data()) == nullptr) {
      throw ClientError(grpc::StatusCode::INTERNAL, "cannot create a temporary directory in " +
                                                        parent.string() + ": " +
                                                        std::strerror(errno));
    }
    path_ = pattern;
  }
  ~TemporaryDirectory() {
    if (path_.empty()) return;
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TemporaryDirectory(const TemporaryDirectory&) = delete;
  TemporaryDirectory& operator=(const TemporaryDirectory&) = delete;

  const fs::path& path() const { return path_; }
  // Replaces an empty (or absent) destination with the temporary directory.
  void commit_to(const fs::path& destination) {
    std::error_code error;
    fs::remove(destination, error);  // only ever an empty directory here
    fs::rename(path_, destination, error);
    if (error) {
      throw ClientError(
          grpc::StatusCode::INTERNAL,
          "cannot move " + path_.string() + " to " + destination.string() + ": " + error.message());
    }
    path_.clear();
  }

 private:
  fs::path path_;
};

// A downloaded checkpoint with a manifest must match it (the trainer's digests), so that what
// lands at the destination is what was trained, not only what the coordinator holds.
template <typename MakeError>
void verify_against_manifest(const fs::path& directory, const MakeError& data_loss) {
  try {
    const auto manifest = read_checkpoint_manifest(directory);
    if (!manifest) return;
    if (const std::string mismatch = checkpoint_manifest_mismatch(directory, *manifest);
        !mismatch.empty()) {
      throw data_loss("it does not match its " + std::string(kCheckpointManifestFile) + ": " +
                      mismatch);
    }
  } catch (const ManifestError& error) {
    throw data_loss(error.what());
  }
}

bool contains(const std::string& text, const char* needle) {
  std::string lower = text;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return lower.find(needle) != std::string::npos;
}

std::string status_code_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "code " + std::to_string(static_cast<int>(code));
  }
}

}  // namespace

std::string describe_status(const grpc::Status& status, const std::string& address) {
  const std::string& message = status.error_message();
  switch (status.error_code()) {
    case grpc::StatusCode::UNAVAILABLE: {
      std::string why = message;
      if (contains(message, "ssl") || contains(message, "handshake") ||
          contains(message, "certificate")) {
        return "TLS with the coordinator at " + address + " failed (" + message +
               "): give its CA bundle (--ca-file, $LOMO_CA_FILE) and, if it requires client "
               "certificates, --cert-file and --key-file";
      }
      if (contains(message, "socket closed") || contains(message, "connection reset")) {
        return "the coordinator at " + address + " closed the connection (" + message +
               "); if it serves TLS, give its CA bundle (--ca-file, $LOMO_CA_FILE), and if it "
               "requires client certificates, --cert-file and --key-file";
      }
      if (contains(message, "connection refused")) {
        why = "connection refused";
      } else if (contains(message, "dns") || contains(message, "resolve")) {
        why = "cannot resolve the host name";
      } else if (contains(message, "timed out") || contains(message, "timeout")) {
        why = "connection timed out";
      } else if (contains(message, "failed to connect")) {
        why = "cannot connect";
      } else {
        return "the coordinator at " + address + " is unavailable: " + message;
      }
      return "cannot reach the coordinator at " + address + " (" + why +
             "); is lomo-coordinator running? set --coordinator or LOMO_COORDINATOR";
    }
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "the coordinator at " + address + " did not answer in time (" + message +
             "); raise --timeout or check that it is not overloaded";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "the coordinator at " + address + " does not implement this call (" + message + ")";
    case grpc::StatusCode::CANCELLED:
      return "the call to the coordinator at " + address + " was cancelled" +
             (message.empty() || message == "Cancelled" || message == "CANCELLED"
                  ? std::string()
                  : " (" + message + ")");
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::OUT_OF_RANGE:
      return message.empty() ? "the coordinator rejected the request (" +
                                   status_code_name(status.error_code()) + ")"
                             : message;
    default:
      return "the coordinator at " + address + " answered " +
             status_code_name(status.error_code()) + ": " + message;
  }
}

Client::Client(ClientOptions options) : options_(std::move(options)) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 64 << 20);
  // Fail fast and report "connection refused" rather than retrying a dead address for seconds.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  channel_ = make_channel(options_.address, args, &options_.security);
  stub_ = lomo::v1::JobService::NewStub(channel_);
}

std::unique_ptr<grpc::ClientContext> Client::unary_context() const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + options_.timeout);
  return context;
}

void Client::fail(const grpc::Status& status) const {
  throw ClientError(status.error_code(), describe_status(status, options_.address));
}

lomo::v1::Job Client::submit_job(const google::protobuf::Struct& spec) {
  lomo::v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  return submit_job(request);
}

lomo::v1::Job Client::submit_job(const lomo::v1::SubmitJobRequest& request) {
  lomo::v1::SubmitJobResponse response;
  auto context = unary_context();
  const grpc::Status status = stub_->SubmitJob(context.get(), request, &response);
  if (!status.ok()) fail(status);
  return response.job();
}

lomo::v1::Job Client::get_job(const std::string& job_id) {
  lomo::v1::GetJobRequest request;
  request.set_job_id(job_id);
  lomo::v1::GetJobResponse response;
  auto context = unary_context();
  const grpc::Status status = stub_->GetJob(context.get(), request, &response);
  if (!status.ok()) fail(status);
  return response.job();
}

std::vector<lomo::v1::Job> Client::list_jobs(const std::vector<lomo::v1::JobState>& states,
                                             int limit) {
  std::vector<lomo::v1::Job> jobs;
  std::string page_token;
  do {
    lomo::v1::ListJobsRequest request;
    for (auto s : states) request.add_states(s);
    const int remaining = limit > 0 ? limit - static_cast<int>(jobs.size()) : 1000;
    request.set_page_size(std::min(remaining, 1000));
    request.set_page_token(page_token);
    lomo::v1::ListJobsResponse response;
    auto context = unary_context();
    const grpc::Status status = stub_->ListJobs(context.get(), request, &response);
    if (!status.ok()) fail(status);
    for (const auto& job : response.jobs()) jobs.push_back(job);
    page_token = response.next_page_token();
  } while (!page_token.empty() && (limit <= 0 || static_cast<int>(jobs.size()) < limit));
  if (limit > 0 && static_cast<int>(jobs.size()) > limit) jobs.resize(static_cast<size_t>(limit));
  return jobs;
}

lomo::v1::Job Client::cancel_job(const std::string& job_id) {
  lomo::v1::CancelJobRequest request;
  request.set_job_id(job_id);
  lomo::v1::CancelJobResponse response;
  auto context = unary_context();
  const grpc::Status status = stub_->CancelJob(context.get(), request, &response);
  if (!status.ok()) fail(status);
  return response.job();
}

std::vector<lomo::v1::CheckpointInfo> Client::list_checkpoints(const std::string& job_id) {
  lomo::v1::ListCheckpointsRequest request;
  request.set_job_id(job_id);
  lomo::v1::ListCheckpointsResponse response;
  auto context = unary_context();
  const grpc::Status status = stub_->ListCheckpoints(context.get(), request, &response);
  if (!status.ok()) fail(status);
  return {response.checkpoints().begin(), response.checkpoints().end()};
}

void Client::track(grpc::ClientContext* context) {
  std::lock_guard lock(mutex_);
  if (cancelled_) context->TryCancel();
  streams_.insert(context);
}

void Client::untrack(grpc::ClientContext* context) {
  std::lock_guard lock(mutex_);
  streams_.erase(context);
}

bool Client::streams_cancelled() {
  std::lock_guard lock(mutex_);
  return cancelled_;
}

void Client::cancel_streams() {
  std::lock_guard lock(mutex_);
  cancelled_ = true;
  for (auto* context : streams_) context->TryCancel();
}

void Client::watch_job(const std::string& job_id, int64_t after_sequence, bool follow,
                       const std::function<bool(const lomo::v1::WatchJobResponse&)>& on_event) {
  lomo::v1::WatchJobRequest request;
  request.set_job_id(job_id);
  request.set_after_sequence(after_sequence);
  request.set_follow(follow);
  grpc::ClientContext context;
  track(&context);
  auto reader = stub_->WatchJob(&context, request);
  lomo::v1::WatchJobResponse response;
  bool stopped_early = false;
  while (reader->Read(&response)) {
    if (!on_event(response)) {
      stopped_early = true;
      context.TryCancel();
      break;
    }
  }
  const grpc::Status status = reader->Finish();
  untrack(&context);
  if (!status.ok() && !stopped_early) fail(status);
}

DownloadResult Client::download_checkpoint(
    const std::string& checkpoint_id, const fs::path& directory,
    const std::vector<lomo::v1::CheckpointFile>& expected,
    const std::function<void(const DownloadProgress&)>& progress) {
  lomo::v1::DownloadCheckpointRequest request;
  request.set_checkpoint_id(checkpoint_id);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + options_.download_timeout);
  track(&context);
  struct Untrack {
    Client* client;
    grpc::ClientContext* context;
    ~Untrack() { client->untrack(context); }
  } untrack_guard{this, &context};
  const auto data_loss = [&](const std::string& why) {
    return ClientError(grpc::StatusCode::DATA_LOSS,
                       "download of " + checkpoint_id + " failed: " + why);
  };

  const fs::path destination = destination_path(directory);
  if (std::error_code error; fs::exists(destination, error) && !fs::is_empty(destination, error)) {
    throw ClientError(grpc::StatusCode::FAILED_PRECONDITION,
                      destination.string() +
                          " exists and is not empty: a download never mixes its files with others");
  }
  // Everything lands in a temporary directory beside the destination, renamed into place only
  // when complete and verified; on any failure it is removed.
  TemporaryDirectory staging(destination);
  auto reader = stub_->DownloadCheckpoint(&context, request);
  FileReceiver receiver(staging.path());
  lomo::v1::DownloadCheckpointResponse response;
  ChunkStream stream;
  stream.next = [&]() { return reader->Read(&response) ? &response.chunk() : nullptr; };
  stream.cancel = [&] {
    context.TryCancel();
    reader->Finish();
  };
  stream.check_end = [&] {
    if (const grpc::Status status = reader->Finish(); !status.ok()) fail(status);
  };
  if (progress) {
    stream.on_chunk = [&](const lomo::v1::FileChunk& chunk) {
      progress({chunk.path(), receiver.bytes_received()});
    };
  }
  try {
    receive_transfer(receiver, stream, expected);
  } catch (const TransferError& error) {
    throw data_loss(error.what());
  }
  if (receiver.files().empty()) throw data_loss("the coordinator sent no files");
  verify_against_manifest(staging.path(), data_loss);
  staging.commit_to(destination);
  return DownloadResult{receiver.files(), receiver.bytes_received()};
}

bool Client::wait_until_reachable(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::system_clock::now() + timeout;
  while (std::chrono::system_clock::now() < deadline) {
    if (channel_->WaitForConnected(std::min(
            deadline, std::chrono::system_clock::now() + std::chrono::milliseconds(250)))) {
      return true;
    }
  }
  return false;
}

}  // namespace lomo::client
